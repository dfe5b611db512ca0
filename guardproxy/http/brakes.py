"""The runaway-agent brake at work: the loop check a budgeted call passes before admission (the
policy in ``budget/fleet.py``, the count in the store's ``lua/loop.v1.lua``).

It runs before the budget is asked at all, so a looping agent's refused requests cost nothing and
hold no reservation. (The spend-velocity count runs after settlement: ``store/velocity.py``.)
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.budget.fleet import request_digest
from guardproxy.config.settings import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.observe.metrics import Metrics
from guardproxy.store.protocol import Store

log = logging.getLogger("guardproxy.brakes")


async def check_loop(
    store: Store, config: Config, metrics: Metrics, tenant: str, key_id: str, job: str, endpoint: str,
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
