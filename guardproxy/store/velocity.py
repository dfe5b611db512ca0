"""The spend-velocity count after each applied charge (the policy in ``budget/fleet.py``, the count in
``lua/velocity.v1.lua``).

It runs after a charge is applied (live or from the journal), once per charge; an unreachable store
skips it (the alert may then come late or not at all), it never holds up or loses the charge itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from guardproxy.config.settings import Config
from guardproxy.errors import StoreUnavailable
from guardproxy.store.protocol import Store
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.brakes")


async def count_velocity(
    store: Store, config: Config, tenant: str, charge: Micros, on_fired: Callable[[str], None] | None = None,
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
