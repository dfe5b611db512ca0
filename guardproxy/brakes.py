"""The fleet brakes at work: the runaway-loop check before admission, the spend-velocity count after
settlement (policies in ``fleet.py``, counting in the store's ``loop.v1.lua`` and ``velocity.v1.lua``).

The loop check runs before the budget is asked at all, so a looping agent's refused requests cost
nothing and hold no reservation. The velocity count runs after a charge is applied (live or from the
journal), once per charge; an unreachable store skips it (the alert may then come late or not at
all), it never holds up or loses the charge itself.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from guardproxy.config import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.fleet import request_digest
from guardproxy.metrics import Metrics
from guardproxy.store import BudgetStore
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.brakes")


async def check_loop(
    store: BudgetStore, config: Config, metrics: Metrics, tenant: str, key_id: str, job: str, endpoint: str,
    body: Mapping[str, Any],
) -> None:
    """Count this request against the tenant's ``loop`` policy: 429 ``loop_detected`` (with Retry-After:
    when the window takes it again) if it repeats too often and the action is ``refuse``."""
    policy = config.policy_for(tenant).loop
    if policy is None:
        return
    digest = request_digest(endpoint, body)
    try:
        count = await store.count_repeat(
            tenant, key_id, job, digest, uuid.uuid4().hex, policy.max_repeats, policy.window_s * 1000,
            action=policy.action, alerts=config.alerts.enabled,
        )
    except StoreUnavailable:
        if config.store.fail_open:
            return  # admission serves it unbudgeted too; a loop check is not worth more than the budget
        raise
    if not count.over:
        return
    metrics.loops_detected.labels(tenant, policy.action).inc()
    log.warning("loop detected tenant=%s key=%s job=%s digest=%s: %d identical requests within %d s (%s)",
                tenant, key_id, job or "-", digest, count.repeats, policy.window_s, policy.action)
    if not policy.refuses:
        return
    retry_after_s = max(1, math.ceil(count.retry_ms / 1000))
    raise GuardError(
        ErrorKind.LOOP_DETECTED,
        f"This exact request was sent more than {policy.max_repeats} times within {policy.window_s} s by this "
        f"key{f' for job {job!r}' if job else ''}: the agent looks stuck in a loop. Change the request, or send "
        f"it again in {retry_after_s} s.",
        headers={"retry-after": str(retry_after_s), "x-should-retry": "false", "x-guardproxy-tenant": tenant,
                 "x-guardproxy-loop-digest": digest},
    )


async def count_velocity(
    store: BudgetStore, config: Config, tenant: str, charge: Micros, on_fired: Callable[[str], None] | None = None,
) -> None:
    """Add an applied ``charge`` to the tenant's hourly spend when it has a ``velocity`` policy; the
    first hour over its factor queues a ``velocity`` alert event and calls ``on_fired``."""
    policy = config.policy_for(tenant).velocity
    if policy is None or charge <= 0:
        return
    try:
        count = await store.count_hourly_spend(tenant, charge, policy.factor_ppm, policy.baseline_hours,
                                               policy.min_micros, alerts=config.alerts.enabled)
    except StoreUnavailable:
        log.warning("velocity: hourly spend of tenant=%s not counted (store unavailable)", tenant)
        return
    if count.fired:
        log.warning("spend velocity tenant=%s: last hour %d micro-USD, over %s x the hourly average of %d",
                    tenant, count.last_hour_micros, policy.factor, count.average_micros)
        if on_fired is not None:
            on_fired(tenant)
