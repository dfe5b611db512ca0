"""The budgeted Batch API: a batch's worst case is reserved when it is submitted, its real usage
charged when it ends.

``POST /v1/batches`` (its input file uploaded through ``POST /v1/files``, so the tenant's own):

1. the input file is read back from the upstream and every line priced at its worst (prompt
   tokens counted, the line's output limit or the model's, at the model's batch price:
   ``ModelConfig.batch_price``), each line validated as the endpoint would validate a call;
2. the sum is reserved in one admission, as a call's worst case is, with a lease as long as the
   batch may run: a batch that does not fit is 429 ``insufficient_quota`` before anything reaches
   the upstream;
3. the batch is created upstream; its reservation and what is needed to settle it are kept in the
   store (``BudgetStore.open_deferred``), so a restart loses nothing.

When the batch ends (``completed``, ``failed``, ``expired``, ``cancelled``), found by the poller
(``BatchPoller``, every ``batches.poll_s``) or by any ``GET /v1/batches/{id}`` or cancel, its output
file is read and each line charged exactly from its usage at the batch price; the reservation is
released by the same settlement (exactly once per batch: the settle script's marker). A cancelled
or expired batch's output holds only the lines that ran, so only they are charged.

Background responses (``background.py``) keep their reservation in the same kind of record and are
settled here too, by the same poller and on the same sightings.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.fleet import key_fingerprint
from guardproxy.budget.levels import KeyBudget, caps_booked
from guardproxy.budget.pricing import Usage, cost_micros, format_usd, lookup_model
from guardproxy.budget.records import Reservation
from guardproxy.budget.tokens import TokenCounter
from guardproxy.config.models import ModelConfig
from guardproxy.config.settings import hash_key
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.http import background, objects
from guardproxy.http.auth import presented_key
from guardproxy.http.endpoints import BUDGETED, ApiShape
from guardproxy.http.levels import check_key_models, level_over_budget
from guardproxy.http.models import model_not_found
from guardproxy.http.requests import parse_json_object
from guardproxy.http.services import Services
from guardproxy.http.upstream import Upstream, UpstreamResponse, response_headers
from guardproxy.store.loops import repeating
from guardproxy.store.redis.base import reply_lost
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.batches")

#: A batch runs up to its 24 h completion window: its reservation holds that long, and an hour more,
#: without renewal (no process needs to stay up for it).
BATCH_LEASE_MS = 25 * 3_600_000
#: How long the note of a settled batch is kept (its ids stay the tenant's in ``objects``).
SETTLED_KEPT_S = 40 * 86400
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_SHAPES = {f"/v1/{shape.path}": shape for shape in BUDGETED}


@dataclass(frozen=True)
class BatchPlan:
    """What a batch may cost at most."""

    worst_micros: Micros
    lines: int
    #: The configured models its lines name.
    models: tuple[str, ...]


def _invalid(line: int, message: str, param: str | None = None) -> GuardError:
    return GuardError(ErrorKind.INVALID_FIELD, f"Batch input line {line}: {message}", param=param)


def plan_batch(content: bytes, endpoint: str, models: Mapping[str, ModelConfig], upstream: str) -> BatchPlan:
    """Validate every line of a batch input file and price its worst case (pure; seconds for 50,000 lines)."""
    shape = _SHAPES.get(endpoint)
    if shape is None:
        raise GuardError(ErrorKind.INVALID_FIELD, f"This proxy budgets batches of {', '.join(sorted(_SHAPES))}, "
                         f"not {endpoint[:100]!r}.", param="endpoint")
    worst = 0
    lines = 0
    used: dict[str, None] = {}
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        lines += 1
        try:
            line = parse_json_object(raw)
        except GuardError:
            raise _invalid(number, "is not a JSON object.") from None
        if line.get("url") != endpoint or line.get("method", "POST") != "POST":
            raise _invalid(number, f"every request of the batch must be POST {endpoint}.", "url")
        if not isinstance(line.get("body"), dict):
            raise _invalid(number, "has no request body.", "body")
        try:
            call = shape.parse(orjson.dumps(line["body"]))
        except GuardError as exc:
            raise _invalid(number, exc.message, exc.param) from None
        if call.stream:
            raise _invalid(number, "a batched request cannot stream.", "stream")
        model = lookup_model(call.model, models)
        if model is None:
            raise model_not_found(call.model, models)
        if model.upstream != upstream:
            raise _invalid(number, f"model {call.model!r} is not served by the upstream holding the input file.",
                           "model")
        prompt = shape.prompt_tokens(TokenCounter(call.model), call.body)
        worst += cost_micros(Usage(prompt, shape.worst_output_tokens(call, model)), model.batch_price)
        used[model.name] = None
    if not lines:
        raise GuardError(ErrorKind.INVALID_FIELD, "The batch input file has no requests.", param="input_file_id")
    return BatchPlan(worst, lines, tuple(used))


@dataclass(frozen=True)
class BatchCharge:
    micros: Micros
    usage: Usage
    #: Output lines charged (answered 200).
    lines: int


def charge_output(
    content: bytes, shape: ApiShape, models: Mapping[str, ModelConfig], fallback: ModelConfig
) -> BatchCharge:
    """What a batch's output file costs: each answered line's usage at its model's batch price,
    rounded up per line as a call's is. A model the config no longer knows is priced as ``fallback``
    (the dearest of the batch's models)."""
    total, prompt, completion, cached, charged = 0, 0, 0, 0, 0
    for raw in content.splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        response = line.get("response") if isinstance(line, dict) else None
        if not isinstance(response, dict) or response.get("status_code") != 200:
            continue
        body = response.get("body")
        usage, texts = shape.answer_usage(body)
        name = body.get("model") if isinstance(body, dict) else None
        model = (lookup_model(name, models) if isinstance(name, str) else None) or fallback
        if usage is None:  # no usage reported: the proxy's own count of what was produced
            usage = Usage(0, TokenCounter(model.name).texts(texts))
        total += cost_micros(usage, model.batch_price)
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        cached += usage.cached_prompt_tokens
        charged += 1
    return BatchCharge(total, Usage(prompt, completion, cached), charged)


class Batches:
    """Submission and settlement of batches for one generation's services."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def submit(
        self, tenant: str, raw: bytes, headers: list[tuple[str, str]], out: dict[str, str], incoming: Headers,
    ) -> Response:
        """``POST /v1/batches``: reserve the batch's worst case, then create it upstream (``incoming``: the
        client's request headers, whose key's budget the batch counts against)."""
        body = parse_json_object(raw)
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        if not isinstance(file_id, str) or not file_id:
            raise GuardError(ErrorKind.MISSING_FIELD, "Missing required parameter: 'input_file_id'.",
                             param="input_file_id")
        if not isinstance(endpoint, str):
            raise GuardError(ErrorKind.MISSING_FIELD, "Missing required parameter: 'endpoint'.", param="endpoint")
        store = self.s.ledger.store
        [holder] = await store.object_upstreams(tenant, [file_id])
        if holder is None or holder not in self.s.upstreams:
            raise objects.not_found(file_id)
        upstream = self.s.upstreams[holder]
        content = await self._read(upstream, f"files/{quote(file_id, safe='')}/content",
                                   upstream.request_headers((), frozenset()), self.s.config.batches.max_input_bytes)
        plan = await anyio.to_thread.run_sync(plan_batch, content, endpoint, self.s.config.models, holder)
        key_budget = self.s.tenants.key_budget(incoming)
        for model in plan.models:
            check_key_models(key_budget, model, model)
        key = presented_key(incoming)
        reservation = await self._reserve(tenant, plan, key_fingerprint(hash_key(key) if key else None), key_budget)
        try:
            response = await upstream.send(upstream.passthrough_path("batches", ""), raw, headers)
            answer_bytes = await response.read()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.s.ledger.settle(reservation, 0)
            raise
        answer = _json_or_none(answer_bytes)
        batch_id = answer.get("id") if isinstance(answer, dict) else None
        if not 200 <= response.status_code < 300 or not isinstance(batch_id, str):
            await self.s.ledger.settle(reservation, 0)
            return Response(answer_bytes, response.status_code, headers={**response_headers(response.headers), **out})
        try:
            await store.open_deferred(tenant, batch_id, {
                "reservation": reservation.id, "day": reservation.day, "month": reservation.month,
                "reserved_micros": reservation.amount, "upstream": holder, "endpoint": endpoint,
                "models": ",".join(plan.models), "lines": plan.lines, "state": "open",
                "submitted_ms": int(time.time() * 1000),
            })
            await store.record_objects(tenant, [batch_id], holder, None)
        except StoreUnavailable:
            # Unrecorded, the batch could never be charged: it must not run.
            log.error("batches: batch %s of tenant=%s could not be recorded; cancelling it upstream", batch_id, tenant)
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(GuardError):
                    await (await upstream.send(upstream.passthrough_path(f"batches/{quote(batch_id, safe='')}/cancel",
                                                                         ""), b"", headers)).read()
                await self.s.ledger.settle(reservation, 0)
            raise
        log.info("batch submitted tenant=%s batch=%s lines=%d reserved_micros=%d upstream=%s", tenant, batch_id,
                 plan.lines, plan.worst_micros, holder)
        headers_out = {**response_headers(response.headers), **out, "x-guardproxy-reserved-usd":
                       f"{plan.worst_micros // 1_000_000}.{plan.worst_micros % 1_000_000:06d}"}
        return Response(answer_bytes, response.status_code, headers=headers_out)

    async def _reserve(
        self, tenant: str, plan: BatchPlan, key_id: str, key_budget: KeyBudget | None,
    ) -> Reservation:
        """The batch's worst case reserved in one admission (no rate window: a batch is not per-minute
        traffic), held for ``BATCH_LEASE_MS``, at every level it belongs to (global, the tenant's hour
        and week, the caller's key, and its model's caps: a batch has one model, as the upstream asks);
        429 when it does not fit."""
        ledger = self.s.ledger
        capped = {model for model, _ in self.s.config.policy_for(tenant).model_caps}
        if len(plan.models) > 1 and capped & set(plan.models):
            # its charge could not be told apart per model: each capped model's batches go on their own
            raise GuardError(ErrorKind.INVALID_FIELD, f"Tenant {tenant!r} caps the spend of "
                             f"{', '.join(sorted(capped & set(plan.models)))}: a batch using it may use no other "
                             f"model (this one uses {', '.join(plan.models)}).", param="input_file_id")
        levels = ledger.level_args(tenant, list(plan.models), key_id, key_budget)
        store = ledger.store
        periods = ledger.periods(tenant)
        policy = self.s.config.policy_for(tenant)
        reservation_id = uuid.uuid4().hex
        await store.register_tenant(tenant)
        try:
            admission = await store.admit(tenant, periods, Thresholds.for_policy(policy), [plan.worst_micros],
                                          reservation_id, BATCH_LEASE_MS, alerts=ledger.alert_args(tenant),
                                          levels=levels)
        except StoreUnavailable as exc:
            if reply_lost(exc):  # the script may have run: release the id, so that a late admit holds nothing
                with anyio.CancelScope(shield=True):
                    await ledger.settle(Reservation(reservation_id, tenant, periods.day, periods.month, 0), 0)
            raise
        if admission.reservation is None and admission.refused_by is not None:
            raise level_over_budget(tenant, admission.refused_by, admission, self.s.clock())
        if admission.reservation is None:
            period = admission.decision.exhausted or "day"
            raise GuardError(
                ErrorKind.OVER_BUDGET,
                f"Tenant {tenant!r} cannot fit this batch: its worst case, {plan.lines} requests at batch prices, "
                f"is {format_usd(plan.worst_micros)} USD, more than is left of its "
                f"{'daily' if period == 'day' else 'monthly'} budget.",
                headers={"x-should-retry": "false", "x-guardproxy-tenant": tenant},
            )
        return admission.reservation

    async def observe(self, tenant: str, seen: Any) -> None:
        """Settle ``seen`` (an upstream batch or background response object) if it has ended and is
        not settled yet."""
        if not isinstance(seen, dict) or not isinstance(seen.get("id"), str) or \
                seen.get("status") not in TERMINAL | background.TERMINAL:
            return
        record = await self.s.ledger.store.deferred_record(tenant, seen["id"])
        if record is None or record.get("state") != "open" or seen.get("status") not in _terminal(record):
            return
        await self._settle(tenant, seen, record)

    async def _settle(self, tenant: str, seen: dict[str, Any], record: dict[str, str]) -> None:
        if record.get("kind") == "response":
            await self._settle_response(tenant, seen, record)
        else:
            await self._settle_batch(tenant, seen, record)

    async def _settle_response(self, tenant: str, response: dict[str, Any], record: dict[str, str]) -> None:
        """A background response that ended: its usage at the price of the model it was sent to."""
        model = self.s.config.models.get(record["model"])
        reservation = Reservation(record["reservation"], tenant, record["day"], record["month"],
                                  int(record["reserved_micros"]), record.get("job", ""),
                                  caps_booked(orjson.loads(record["levels"])) if record.get("levels") else ())
        if model is None:  # the model left the config: the worst case reserved is what it may have cost
            usage, charge = None, reservation.amount
        else:
            usage, charge = background.finished_charge(response, model, int(record.get("prompt_tokens", 0)))
        counted = usage or Usage(0, 0)
        status = str(response["status"])
        await self.s.ledger.settle(reservation, charge, {
            "request_id": record.get("request_id") or response["id"], "requested_model": record["requested_model"],
            "model": record["model"], "prompt_tokens": counted.prompt_tokens,
            "completion_tokens": counted.completion_tokens, "cached_tokens": counted.cached_prompt_tokens,
            "cost_micros": charge, "outcome": f"background_{status}",
            **({"job": reservation.job} if reservation.job else {}),
        })
        await self.s.ledger.store.close_deferred(tenant, response["id"], {
            "state": "settled", "status": status, "charged_micros": charge,
            "settled_ms": int(time.time() * 1000)}, SETTLED_KEPT_S)
        log.info("background response settled tenant=%s response=%s status=%s charged_micros=%d reserved_micros=%d",
                 tenant, response["id"], status, charge, reservation.amount)

    async def _settle_batch(self, tenant: str, batch: dict[str, Any], record: dict[str, str]) -> None:
        batch_id = batch["id"]
        upstream = self.s.upstreams.get(record["upstream"])
        if upstream is None:
            log.error("batches: batch %s of tenant=%s is on upstream %r, no longer configured; it stays reserved "
                      "until its lease ends", batch_id, tenant, record["upstream"])
            return
        models = self.s.config.models
        used = [models[name] for name in record.get("models", "").split(",") if name in models]
        fallback = max(used or models.values(), key=lambda m: (m.batch_price.output, m.batch_price.input))
        charge = BatchCharge(0, Usage(0, 0), 0)
        output = batch.get("output_file_id")
        if isinstance(output, str) and output:
            content = await self._read(upstream, f"files/{quote(output, safe='')}/content",
                                       upstream.request_headers((), frozenset()), None)
            charge = await anyio.to_thread.run_sync(charge_output, content, _SHAPES[record["endpoint"]], models,
                                                    fallback)
        reservation = Reservation(record["reservation"], tenant, record["day"], record["month"],
                                  int(record["reserved_micros"]))
        status = str(batch["status"])
        await self.s.ledger.settle(reservation, charge.micros, {
            "request_id": batch_id, "requested_model": ",".join(m.name for m in used), "model": fallback.name,
            "prompt_tokens": charge.usage.prompt_tokens, "completion_tokens": charge.usage.completion_tokens,
            "cached_tokens": charge.usage.cached_prompt_tokens, "cost_micros": charge.micros,
            "outcome": f"batch_{status}",
        })
        await self.s.ledger.store.close_deferred(tenant, batch_id, {
            "state": "settled", "status": status, "charged_micros": charge.micros, "charged_lines": charge.lines,
            "settled_ms": int(time.time() * 1000)}, SETTLED_KEPT_S)
        await objects.record(self.s.ledger.store, tenant, "files", objects.derived_ids(batch), upstream.name)
        log.info("batch settled tenant=%s batch=%s status=%s lines=%d charged_micros=%d reserved_micros=%s", tenant,
                 batch_id, status, charge.lines, charge.micros, record["reserved_micros"])

    async def poll(self) -> int:
        """Ask the upstream about every open batch of every tenant once; settle those that ended.
        Returns how many were settled."""
        store = self.s.ledger.store
        settled = 0
        for tenant in sorted(await store.known_tenants()):
            for batch_id in await store.open_deferred_ids(tenant):
                record = await store.deferred_record(tenant, batch_id)
                upstream = self.s.upstreams.get(record["upstream"]) if record else None
                if record is None or upstream is None:
                    continue
                collection = "responses" if record.get("kind") == "response" else "batches"
                try:
                    response = await upstream.send(
                        upstream.passthrough_path(f"{collection}/{quote(batch_id, safe='')}", ""), b"",
                        upstream.request_headers((), frozenset()), method="GET")
                    seen = _json_or_none(await response.read())
                    if response.status_code == 200 and isinstance(seen, dict) \
                            and seen.get("status") in _terminal(record):
                        await self._settle(tenant, seen, record)
                        settled += 1
                except GuardError as exc:
                    log.warning("batches: could not ask about batch %s of tenant=%s: %s", batch_id, tenant,
                                exc.message)
        return settled

    async def _read(self, upstream: Upstream, path: str, headers: list[tuple[str, str]], limit: int | None) -> bytes:
        """A file's content from ``upstream`` (``limit``: refuse a larger one, 400)."""
        response: UpstreamResponse = await upstream.send(upstream.passthrough_path(path, ""), b"", headers,
                                                         method="GET")
        if response.status_code != 200:
            await response.aclose()
            raise GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, f"upstream {upstream.name!r} answered "
                             f"{response.status_code} for a batch file")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.chunks():
                size += len(chunk)
                if limit is not None and size > limit:
                    raise GuardError(ErrorKind.INVALID_FIELD, f"The batch input file is larger than this proxy "
                                     f"prices ({limit} bytes; batches.max_input_bytes).", param="input_file_id")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return b"".join(chunks)


class BatchPoller:
    """Polls open batches in the background (``batches.poll_s``), for the current generation."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return repeating(lambda: Batches(self.services()).poll(), lambda: self.services().config.batches.poll_s,
                         name="batch poller", log=log, sleep_first=True)


def _terminal(record: dict[str, str]) -> frozenset[str]:
    """The states in which the deferred call of ``record`` has ended."""
    return background.TERMINAL if record.get("kind") == "response" else TERMINAL


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
