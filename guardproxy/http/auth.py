"""Who the tenant is (contract §3): tenant keys, service keys with a tenant or job header."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from guardproxy.budget.levels import KeyBudget
from guardproxy.config.servicetitan import canonical_job_id
from guardproxy.config.settings import TENANT_ID, Config, hash_key
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.store.keys import KeyRing, lookup_or_503

ST_TENANT_HEADER = "x-servicetitan-tenant-id"
#: Names the job (work order, ticket, conversation) a call belongs to, for its cost and cap.
JOB_HEADER = "x-guardproxy-job"


class JobTenantResolver(Protocol):
    """Maps a ServiceTitan job id to a budget tenant (``guardproxy.servicetitan``)."""

    async def tenant_for_job(self, job_id: str, st_tenant_id: str | None) -> str: ...


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from ``Authorization: Bearer <key>`` or ``api-key: <key>``."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("api-key", "").strip() or None


class TenantResolver:
    """Resolves the budget tenant of a request from its headers."""

    def __init__(self, config: Config, jobs: JobTenantResolver | None = None, keyring: KeyRing | None = None) -> None:
        self.tenant_by_key = {h: t.id for t in config.tenants.values() for h in t.key_hashes}
        #: Budgets of config keys (``api_key_budgets``) by key digest.
        self.key_budgets = {d: b for t in config.tenants.values() for d, b in t.key_budgets.items()}
        self.service_keys = frozenset(config.auth.service_key_hashes)
        self.tenant_header = config.auth.tenant_header.lower()
        self.job_header = config.auth.job_header.lower()
        self.jobs = jobs
        #: Keys created at runtime (``guardproxy.store.keys``), looked up after proxy.yaml's.
        self.keyring = keyring

    @property
    def routing_headers(self) -> frozenset[str]:
        """Headers that only steer the proxy and are not sent upstream."""
        return frozenset({self.tenant_header, self.job_header, ST_TENANT_HEADER, JOB_HEADER, "x-guardproxy-cache"})

    def job_of(self, headers: Mapping[str, str]) -> str:
        """The job a call belongs to: ``X-Guardproxy-Job``, else the ServiceTitan job header (a
        number in its canonical form: ``0123`` is job ``123``); ``""`` for none; 400 for an id that does
        not follow the tenant-id rule."""
        own = (headers.get(JOB_HEADER) or "").strip()
        job = own or canonical_job_id((headers.get(self.job_header) or "").strip())
        if job and not TENANT_ID.fullmatch(job):
            raise GuardError(
                ErrorKind.INVALID_JOB_ID,
                "Job ids are 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit.",
            )
        return job

    def key_budget(self, headers: Mapping[str, str]) -> KeyBudget | None:
        """The presented key's own budget (a config key's ``api_key_budgets``, a runtime key's as read
        by ``authenticate``), ``None`` for none."""
        key = presented_key(headers)
        if key is None:
            return None
        digest = hash_key(key)
        budget = self.key_budgets.get(digest)
        if budget is None and self.keyring is not None:
            budget = self.keyring.budget_of(digest)
        return budget

    async def authenticate(self, headers: Mapping[str, str]) -> str | None:
        """The tenant of a tenant key, ``None`` for a service key; 401 for anything else."""
        key = presented_key(headers)
        if key is None:
            raise GuardError(ErrorKind.INVALID_API_KEY, "Missing API key: send it as 'Authorization: Bearer <key>'.")
        digest = hash_key(key)
        tenant = self.tenant_by_key.get(digest)
        if tenant is not None:
            return tenant
        if digest in self.service_keys:
            return None
        if self.keyring is not None:
            tenant = await lookup_or_503(self.keyring, digest)
            if tenant is not None:
                return tenant
        raise GuardError(ErrorKind.INVALID_API_KEY, "Incorrect API key provided.")

    async def resolve(self, headers: Mapping[str, str]) -> str:
        tenant = await self.authenticate(headers)
        named = headers.get(self.tenant_header)
        if tenant is not None:
            if named is not None and named != tenant:
                raise GuardError(
                    ErrorKind.TENANT_MISMATCH,
                    f"This API key belongs to tenant {tenant!r} and cannot act for {named[:64]!r}.",
                )
            return tenant
        job_id = headers.get(self.job_header)
        if job_id is not None:
            if self.jobs is None:
                raise GuardError(
                    ErrorKind.INVALID_FIELD,
                    f"{self.job_header} was sent, but ServiceTitan lookups are not configured on this proxy.",
                )
            return await self.jobs.tenant_for_job(job_id.strip(" \t"), headers.get(ST_TENANT_HEADER))
        if named is None:
            raise GuardError(
                ErrorKind.MISSING_TENANT,
                f"A service key must name the tenant with the {self.tenant_header} or {self.job_header} header.",
            )
        return valid_tenant(named)


def valid_tenant(tenant: str) -> str:
    if not TENANT_ID.fullmatch(tenant):
        raise GuardError(
            ErrorKind.INVALID_TENANT,
            "Tenant ids are 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit.",
        )
    return tenant
