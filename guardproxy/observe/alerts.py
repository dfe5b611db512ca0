"""Budget alerts: events the store's scripts queue, delivered to webhooks in the background.

The admission and settlement scripts decide each event atomically, once per tenant, period and
threshold across every replica, and queue it in the tenant's stream in the store (so it survives a
restart). ``AlertSender`` runs in each process's lifespan: it claims due events with a lease
(``lua/claim.v1.lua``, so two replicas never deliver the same one), POSTs them to every webhook that
asked for their kind, and reschedules a failed delivery with exponential backoff for up to
``GIVE_UP_AFTER_S`` (more than a day) before dropping it. Nothing here runs on a request's path.

``event_json`` and ``slack_text`` are pure: what a receiver gets for one event.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, date, datetime
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import orjson

from guardproxy.budget.levels import window_ids
from guardproxy.budget.periods import iso_utc, periods_at
from guardproxy.budget.pricing import format_usd, micros_to_usd
from guardproxy.budget.records import QueuedAlert
from guardproxy.config.settings import Config, WebhookConfig
from guardproxy.observe.state import all_tenants
from guardproxy.store.health import STORE_EVENTS_TENANT
from guardproxy.store.loops import repeating
from guardproxy.store.protocol import Store

log = logging.getLogger("guardproxy.alerts")

#: How often a sender looks for due events.
POLL_INTERVAL_S = 1.0
#: How long a claimed event is this sender's alone (longer than a delivery can take).
CLAIM_LEASE_MS = 60_000
WEBHOOK_TIMEOUT_S = 10.0
#: Retries wait 0.5 s, 1 s, 2 s, ... up to 5 minutes between attempts.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 300.0
#: An event no webhook took for this long is dropped (logged and counted).
GIVE_UP_AFTER_S = 26 * 3600


def retry_delay_s(attempts: int) -> float:
    """The wait before the next try, after ``attempts`` failed ones (exponential, capped)."""
    return float(min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempts - 1)))


def event_json(fields: Mapping[str, str], zone: ZoneInfo) -> dict[str, Any]:
    """The JSON body of one event, from the fields the script queued and the tenant's timezone."""
    if fields.get("event") == "store":  # about the store itself (``store_health``), no tenant
        return {"event": "store", "tenant": None, "problem": fields.get("problem"), "message": fields.get("message"),
                "at": iso_utc(datetime.fromtimestamp(int(fields.get("at_ms", 0)) / 1000, UTC))}
    if fields.get("event") in ("loop", "velocity"):
        return brake_event_json(fields)
    spent, limit = int(fields.get("spent", 0)), int(fields.get("limit", 0))
    threshold = fields.get("threshold") or ""
    period, period_id = fields.get("period", "day"), fields.get("period_id", "")
    level = fields.get("level")
    if level == "global":
        zone = ZoneInfo("UTC")  # the global level's periods are UTC ones
    if level is not None:
        # an event of a level beside the tenant's day and month (budget/levels.py): which one
        return {"event": fields.get("event"), "tenant": fields.get("tenant"), "level": level, "period": period,
                "period_id": period_id, "threshold": int(threshold) / 1_000_000 if threshold else None,
                "spent_usd": micros_to_usd(spent), "limit_usd": micros_to_usd(limit),
                "utilization": round(spent / limit, 6) if limit else None,
                "at": iso_utc(datetime.fromtimestamp(int(fields.get("at_ms", 0)) / 1000, UTC)),
                "resets_at": _window_resets_at(period, period_id, zone)}
    return {
        "event": fields.get("event"),
        "tenant": fields.get("tenant"),
        "period": period,
        "period_id": period_id,
        "threshold": int(threshold) / 1_000_000 if threshold else None,
        "spent_usd": micros_to_usd(spent),
        "limit_usd": micros_to_usd(limit),
        "utilization": round(spent / limit, 6) if limit else None,
        "at": iso_utc(datetime.fromtimestamp(int(fields.get("at_ms", 0)) / 1000, UTC)),
        "resets_at": _resets_at(period, period_id, zone),
    }


def brake_event_json(fields: Mapping[str, str]) -> dict[str, Any]:
    """A ``loop`` event (``lua/loop.v1.lua``: one key sent one request too often for one job) or a
    ``velocity`` event (``lua/velocity.v1.lua``: the tenant's last hour against its hourly average)."""
    at = iso_utc(datetime.fromtimestamp(int(fields.get("at_ms", 0)) / 1000, UTC))
    if fields.get("event") == "loop":
        return {
            "event": "loop", "tenant": fields.get("tenant"), "key": fields.get("key"),
            "job": fields.get("job") or None, "request_digest": fields.get("digest"),
            "repeats": int(fields.get("repeats", 0)), "max_repeats": int(fields.get("max_repeats", 0)),
            "window_s": int(fields.get("window_ms", 0)) / 1000, "action": fields.get("action"), "at": at,
        }
    hour = int(fields.get("hour", 0))
    return {
        "event": "velocity", "tenant": fields.get("tenant"), "period": "hour",
        "hour_start": iso_utc(datetime.fromtimestamp(hour * 3600, UTC)),
        "last_hour_usd": micros_to_usd(int(fields.get("spent", 0))),
        "hourly_average_usd": micros_to_usd(int(fields.get("baseline", 0))),
        "limit_usd": micros_to_usd(int(fields.get("limit", 0))),
        "factor": int(fields.get("factor_ppm", 0)) / 1_000_000, "at": at,
    }


def _resets_at(period: str, period_id: str, zone: ZoneInfo) -> str | None:
    try:
        day = date.fromisoformat(period_id if period == "day" else f"{period_id}-01")
    except ValueError:
        return None
    periods = periods_at(datetime.combine(day, clock_time(12), tzinfo=zone), zone)
    return iso_utc(periods.day_resets_at if period == "day" else periods.month_resets_at)


def _window_resets_at(window: str, period_id: str, zone: ZoneInfo) -> str | None:
    """When a level's window (hour ``2026-12-07T14``, ISO week ``2026-W50``, day, month) ends."""
    try:
        if window == "hour":
            start = datetime.strptime(period_id, "%Y-%m-%dT%H").replace(tzinfo=zone)
        elif window == "week":
            year, week = period_id.split("-W")
            start = datetime.combine(date.fromisocalendar(int(year), int(week), 1), clock_time(0), tzinfo=zone)
        else:
            return _resets_at(window, period_id, zone)
    except ValueError:
        return None
    return iso_utc(window_ids(start, zone).resets_at[window])


def slack_text(event: Mapping[str, Any]) -> str:
    """One readable line with the event's facts, for Slack's incoming webhooks."""
    if event["event"] == "store":
        return f"guardproxy: budget store problem ({event['problem']}): {event['message']}"
    if event["event"] == "loop":
        job = f" for job {event['job']}" if event["job"] else ""
        verb = "refused" if event["action"] == "refuse" else "let through (alert only)"
        return (f"guardproxy: tenant {event['tenant']}'s key {event['key']} sent the same request more than "
                f"{event['max_repeats']} times within {event['window_s']:g} s{job}: a runaway agent? Repeats are "
                f"{verb}.")
    if event["event"] == "velocity":
        return (f"guardproxy: tenant {event['tenant']} spent ${event['last_hour_usd']:,.2f} in the last hour, over "
                f"{event['factor']:g}x its hourly average of ${event['hourly_average_usd']:,.2f}.")
    period = {"hour": "hourly", "day": "daily", "week": "weekly"}.get(event["period"], "monthly")
    spent = f"${format_usd(round(event['spent_usd'] * 1_000_000))}"
    limit = f"${format_usd(round(event['limit_usd'] * 1_000_000))}"
    where = f"tenant {event['tenant']}'s {period} budget ({event['period_id']})"
    level = event.get("level")
    if level == "global":
        where = f"the global {period} budget of all tenants ({event['period_id']}, hit by tenant {event['tenant']})"
    elif level in ("key", "model"):
        where = f"a {level} budget of tenant {event['tenant']}: {period} ({event['period_id']})"
    if event["event"] == "threshold":
        what = f"{where} reached {event['threshold'] * 100:g}%: {spent} of {limit} spent"
    elif event["event"] == "downgrading":
        what = f"{where} is downgrading calls to cheaper models: {spent} of {limit} spent"
    else:
        what = f"{where} is exhausted, calls are refused: {spent} of {limit} spent"
    return f"guardproxy: {what}; resets {event['resets_at']}."


def webhook_body(hook: WebhookConfig, event: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"text": slack_text(event)} if hook.format == "slack" else event)


class AlertSender:
    """Delivers this store's queued alert events to ``config().alerts.webhooks``, from any replica.

    A webhook is known by its place in the list: reordering the list in a reload while an event is
    being retried may send that event to a webhook twice or skip one."""

    def __init__(
        self, store: Store, config: Callable[[], Config], on_result: Callable[[str, str], None]
    ) -> None:
        self.store = store
        #: The current config (it may be reloaded): nothing is claimed while it has no webhook.
        self.config = config
        #: Hears (event, result) of each delivery attempt: delivered, failed (retried later), dropped.
        self.on_result = on_result
        self._http = httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Deliver in the background until the block ends."""
        try:
            # the events wait in the store while it is unavailable; tried again next tick
            async with repeating(self.deliver_due, lambda: POLL_INTERVAL_S, name="alert sender", log=log):
                yield
        finally:
            await self._http.aclose()

    async def deliver_due(self) -> int:
        """Claim and deliver every due event once; returns how many were claimed."""
        config = self.config()
        if not config.alerts.enabled:
            return 0
        tenants = [*await all_tenants(self.store, config), STORE_EVENTS_TENANT]
        claimed = await self.store.claim_alerts(tenants, CLAIM_LEASE_MS)
        if claimed:
            async with anyio.create_task_group() as group:
                for alert in claimed:
                    group.start_soon(self._deliver, config, alert)
        return len(claimed)

    async def _deliver(self, config: Config, alert: QueuedAlert) -> None:
        kind = alert.fields.get("event", "")
        event = event_json(alert.fields, config.policy_for(alert.tenant).zone)
        delivered = set(alert.delivered_to)
        errors = []
        for index, hook in enumerate(config.alerts.webhooks):
            if index in delivered or kind not in hook.events:
                continue
            error = await self._post(hook, event)
            if error:
                errors.append(f"webhook {index}: {error}")
            else:
                delivered.add(index)
        if not errors:
            if delivered - alert.delivered_to:  # not counted when no webhook asked for this kind
                self.on_result(kind, "delivered")
            await self.store.record_delivery(alert, delivered, "delivered")
            return
        error = "; ".join(errors)
        age_s = time.time() - int(alert.fields.get("at_ms", 0)) / 1000
        if age_s > GIVE_UP_AFTER_S:
            log.error("alert %s %s for tenant=%s dropped after %d attempts: %s", alert.id, kind, alert.tenant,
                      alert.attempts + 1, error)
            self.on_result(kind, "dropped")
            await self.store.record_delivery(alert, delivered, "dropped", error=error)
            return
        log.warning("alert %s %s for tenant=%s not delivered (attempt %d): %s", alert.id, kind, alert.tenant,
                    alert.attempts + 1, error)
        self.on_result(kind, "failed")
        # this process's clock against the claim script's TIME: a skew only shifts the retry a little
        next_at_ms = int((time.time() + retry_delay_s(alert.attempts + 1)) * 1000)
        await self.store.record_delivery(alert, delivered, "retrying", next_at_ms, error)

    async def _post(self, hook: WebhookConfig, event: Mapping[str, Any]) -> str:
        """"" when the webhook took the event, else why not (the URL is not logged: it may hold a secret)."""
        headers = {"content-type": "application/json", **hook.headers}
        try:
            response = await self._http.post(hook.url, content=webhook_body(hook, event), headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if not 200 <= response.status_code < 300:
            return f"HTTP {response.status_code}"
        return ""
