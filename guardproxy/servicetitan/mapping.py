"""Which budget tenant a ServiceTitan job belongs to: the ``tenant_from`` rules, as pure functions.

``tenant_map`` is consulted first under every rule (its keys are job values as strings), so an
operator can rename any value, e.g. ``{"ACME-HVAC": "acme"}`` for ``customField:Budget Code``. When
the map has no entry:

- ``st_tenant`` -> ``st-<st_tenant_id>``
- ``businessUnitId`` | ``customerId`` | ``locationId`` | ``jobTypeId`` -> ``<field>-<value>``
- ``externalData:<key>`` / ``customField:<name>`` -> the entry's value itself.

A job without the field or entry, or whose result is not a valid tenant id, raises
``UnmappableJob``. The resolver answers it with ``invalid_tenant`` (400): the job exists, but it
does not name a budget tenant the proxy can charge, which the caller or the operator must fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardproxy.config.servicetitan import JOB_ID_FIELDS, TENANT_ID, ServiceTitanConfig
from guardproxy.config.validation import describe


class UnmappableJob(Exception):
    """A job that does not yield a valid budget tenant id; the message says why (no secrets)."""


def tenant_for(job: Mapping[str, Any], st_tenant_id: int, config: ServiceTitanConfig) -> str:
    """The budget tenant id of ``job`` (a job as ServiceTitan returns it) under ``config.tenant_from``."""
    rule, _, name = config.tenant_from.partition(":")
    value, fallback = job_value(job, st_tenant_id, rule, name)
    tenant = config.tenant_map.get(value, fallback)
    if not TENANT_ID.fullmatch(tenant):
        raise UnmappableJob(
            f"{config.tenant_from} of job {job.get('id')} gives {describe(tenant)}, which is not a valid "
            "tenant id (letters, digits, '.', '_', '-'; at most 64); map it in servicetitan.tenant_map"
        )
    return tenant


def job_value(job: Mapping[str, Any], st_tenant_id: int, rule: str, name: str) -> tuple[str, str]:
    """The job's value under ``rule`` as a ``tenant_map`` key, and the tenant id to use when unmapped."""
    if rule == "st_tenant":
        return str(st_tenant_id), f"st-{st_tenant_id}"
    if rule in JOB_ID_FIELDS:
        value = job.get(rule)
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise UnmappableJob(f"job {job.get('id')} has no {rule}")
        return str(value), f"{rule}-{value}"
    if rule == "externalData":
        text = entry_value(job.get("externalData"), "key", name)
        if text is None:
            raise UnmappableJob(f"job {job.get('id')} has no externalData entry {name!r}")
        return text, text
    if rule == "customField":
        text = entry_value(job.get("customFields"), "name", name)
        if text is None:
            raise UnmappableJob(f"job {job.get('id')} has no value in custom field {name!r}")
        return text, text
    raise ValueError(f"unknown tenant_from rule {rule!r}")  # settings rejects these at start-up


def entry_value(entries: Any, label: str, name: str) -> str | None:
    """The non-empty ``value`` of the first entry in ``entries`` whose ``label`` field is ``name``."""
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get(label) == name:
            value = entry.get("value")
            if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                return None
            return str(value)
    return None
