"""A fake ServiceTitan (token endpoint and jobs API) for tests and demos: a real Starlette app.

Serve ``FakeServiceTitan(...).app`` on loopback and point the config at it
(``fake.config_section(base_url)``). It speaks the shapes of servicetitan.md, checks credentials,
tokens (and their expiry) and the app key, and has knobs: ``fail_next`` (the next N calls answer a
given status), ``jobs_delay_s``, ``expire_tokens``, and counters (``calls``, ``tokens_issued``).

The app runs in the server's thread while tests read and set the knobs from theirs; a lock guards
every change.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Endpoint = Literal["token", "jobs"]


@dataclass(frozen=True)
class Failure:
    status: int
    retry_after_s: int | None = None


class FakeServiceTitan:
    """State and knobs of one fake ServiceTitan; ``app`` is the ASGI app serving it."""

    def __init__(self, *, app_key: str = "fake-app-key", expires_in_s: int = 900) -> None:
        self.app_key = app_key
        self.expires_in_s = expires_in_s
        self.jobs_delay_s = 0.0
        #: Requests per endpoint ("token", "jobs"), counted before any check.
        self.calls: Counter[str] = Counter()
        #: Jobs requests per ServiceTitan tenant id.
        self.jobs_calls_by_tenant: Counter[int] = Counter()
        self.tokens_issued = 0
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, int]] = {}  # client_id -> (secret, st_tenant_id)
        self._jobs: dict[tuple[int, int], dict[str, Any]] = {}
        self._tokens: dict[str, tuple[int, float]] = {}  # token -> (st_tenant_id, expires at, monotonic)
        self._failures: dict[str, deque[Failure]] = {"token": deque(), "jobs": deque()}
        self.app = Starlette(
            routes=[
                Route("/connect/token", self.token_endpoint, methods=["POST"]),
                Route("/jpm/v2/tenant/{tid}/jobs/{job_id}", self.jobs_endpoint, methods=["GET"]),
            ]
        )

    def add_client(self, st_tenant_id: int, client_id: str, client_secret: str) -> None:
        """Accept these client credentials; their tokens are good for ``st_tenant_id`` only."""
        with self._lock:
            self._clients[client_id] = (client_secret, st_tenant_id)

    def add_job(self, st_tenant_id: int, job: dict[str, Any]) -> None:
        """Serve ``job`` (keyed by its ``id``) to ``GET /jpm/v2/tenant/{st_tenant_id}/jobs/{id}``."""
        with self._lock:
            self._jobs[(st_tenant_id, int(job["id"]))] = job

    def fail_next(
        self, endpoint: Endpoint, status: int, times: int = 1, *, retry_after_s: int | None = None
    ) -> None:
        """Answer the next ``times`` calls of ``endpoint`` with ``status`` (and ``Retry-After``)."""
        with self._lock:
            self._failures[endpoint].extend([Failure(status, retry_after_s)] * times)

    def issued_tokens(self) -> list[str]:
        """Every access token handed out so far (tests check that none of them leaks)."""
        with self._lock:
            return list(self._tokens)

    def expire_tokens(self) -> None:
        """Make every token issued so far expired, as if time had passed."""
        with self._lock:
            self._tokens = {t: (tid, 0.0) for t, (tid, _) in self._tokens.items()}

    def config_section(self, base_url: str, **overrides: Any) -> dict[str, Any]:
        """A raw ``servicetitan`` config section pointing at this fake, with every client as a connection."""
        with self._lock:
            connections = [
                {"st_tenant_id": tid, "client_id": cid, "client_secret": secret}
                for cid, (secret, tid) in self._clients.items()
            ]
        section: dict[str, Any] = {
            "environment": "integration",
            "auth_url": f"{base_url}/connect/token",
            "api_url": base_url,
            "app_key": self.app_key,
            "connections": connections,
        }
        section.update(overrides)
        return section

    async def token_endpoint(self, request: Request) -> Response:
        failure = self._count("token")
        if failure is not None:
            return failure_response(failure)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        with self._lock:
            client = self._clients.get(form.get("client_id", ""))
            if client is None or not secrets.compare_digest(client[0], form.get("client_secret", "")):
                return JSONResponse({"error": "invalid_client"}, status_code=400)
            token = secrets.token_urlsafe(24)
            self._tokens[token] = (client[1], time.monotonic() + self.expires_in_s)
            self.tokens_issued += 1
        return JSONResponse({"access_token": token, "expires_in": self.expires_in_s, "token_type": "Bearer"})

    async def jobs_endpoint(self, request: Request) -> Response:
        tid_text, job_text = request.path_params["tid"], request.path_params["job_id"]
        failure = self._count("jobs", tid_text)
        if self.jobs_delay_s:
            await asyncio.sleep(self.jobs_delay_s)
        if failure is not None:
            return failure_response(failure)
        if not (tid_text.isdigit() and job_text.isdigit()):
            return problem(400, "One or more validation errors occurred.")
        tid, job_id = int(tid_text), int(job_text)
        with self._lock:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            granted = self._tokens.get(token) if scheme == "Bearer" else None
            if granted is None or granted[1] <= time.monotonic():
                return problem(401, "Unauthorized")
            if request.headers.get("st-app-key") != self.app_key or granted[0] != tid:
                return problem(403, "Forbidden")
            job = self._jobs.get((tid, job_id))
        if job is None:
            return problem(404, f"Job with id {job_id} not found")
        return JSONResponse(job)

    def _count(self, endpoint: Endpoint, st_tenant_id: str = "") -> Failure | None:
        with self._lock:
            self.calls[endpoint] += 1
            if st_tenant_id.isdigit():
                self.jobs_calls_by_tenant[int(st_tenant_id)] += 1
            queue = self._failures[endpoint]
            return queue.popleft() if queue else None


def failure_response(failure: Failure) -> Response:
    headers = {"Retry-After": str(failure.retry_after_s)} if failure.retry_after_s is not None else None
    return problem(failure.status, "Injected failure", headers=headers)


def problem(status: int, title: str, *, headers: dict[str, str] | None = None) -> Response:
    """An RFC 7807 body, as ServiceTitan answers errors."""
    body = {
        "type": f"https://httpstatuses.io/{status}",
        "title": title,
        "status": status,
        "traceId": uuid.uuid4().hex,
        "errors": {},
        "data": {},
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")
