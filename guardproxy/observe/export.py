"""The chargeback export: the call log as FinOps FOCUS 1.2 rows, one per call and token class.

Each settled call of the tenants' call logs (``BudgetStore.logged_calls``) becomes one row per token
class it used: ``input`` (uncached prompt), ``cached_input``, ``cache_write``, ``output`` (completion
less reasoning) and ``reasoning``. The call's charge (``cost_micros``, what the day and month
counters got) is split over its rows in proportion to each row's exact cost at the prices it was
charged at, in whole micro-USD by the largest remainder (ties to the earlier class), so the rows of a
call always add up to its charge and an export's total to the counters'. ``ListCost`` prices the
tokens at the list price of their kind (the input price for cached input), so the cache discount is
``ListCost - EffectiveCost``. Spend booked from elsewhere (``outcome: external``) is one row at its
booked cost. Calls that cost nothing (failed attempts) have no rows.

``focus_rows`` is pure; ``collect`` reads the store; ``write_csv`` and ``write_parquet`` (pyarrow, the
``parquet`` extra) write them. The call log keeps ``store.call_log_size`` entries per tenant: an
export reaching past the oldest kept entry is marked incomplete (``Export.incomplete``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import IO, Any

import orjson

from guardproxy.budget.pricing import TOKENS_PER_PRICE_UNIT, Price, lookup_model
from guardproxy.budget.records import LoggedCall
from guardproxy.config.settings import Config
from guardproxy.store.protocol import Store
from guardproxy.types import Micros

TOKEN_CLASSES = ("input", "cached_input", "cache_write", "output", "reasoning")
_CLASS_NAMES = {"input": "input tokens", "cached_input": "cached input tokens", "cache_write": "cache write tokens",
                "output": "output tokens", "reasoning": "reasoning tokens", "external": "spend booked from elsewhere"}
FORMATS = ("csv", "parquet")
PAGE = 1000

#: FOCUS 1.2 columns, in the specification's (alphabetical) order, then guardproxy's own (``x_``).
FOCUS_COLUMNS = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType",
    "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "CapacityReservationId",
    "CapacityReservationStatus", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency",
    "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountCategory", "CommitmentDiscountId",
    "CommitmentDiscountName", "CommitmentDiscountQuantity", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "CommitmentDiscountUnit", "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice",
    "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory",
    "PricingCurrency", "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "RegionId", "RegionName",
    "ResourceId", "ResourceName", "ResourceType", "ServiceCategory", "ServiceName", "ServiceSubcategory", "SkuId",
    "SkuMeter", "SkuPriceDetails", "SkuPriceId", "SubAccountId", "SubAccountName", "SubAccountType", "Tags",
)
EXTRA_COLUMNS = (
    "x_TenantId", "x_KeyId", "x_JobId", "x_RequestId", "x_TokenClass", "x_RequestedModel", "x_Outcome",
    "x_BudgetDay", "x_SettledAt", "x_CostMicros",
)
COLUMNS = FOCUS_COLUMNS + EXTRA_COLUMNS
#: Columns holding USD amounts (6 decimals), unit prices (USD per token, 12 decimals) and counts.
COST_COLUMNS = ("BilledCost", "ContractedCost", "EffectiveCost", "ListCost")
UNIT_PRICE_COLUMNS = ("ContractedUnitPrice", "ListUnitPrice")
QUANTITY_COLUMNS = ("ConsumedQuantity", "PricingQuantity", "x_CostMicros")
TIME_COLUMNS = ("BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart", "x_SettledAt")

Row = dict[str, Any]


@dataclass(frozen=True)
class Line:
    """One token class of one call: its tokens, list and charged price (micro-USD per 1M tokens), and
    its share of the call's charge and list cost (micro-USD)."""

    token_class: str
    quantity: int
    list_price: int
    price: int
    effective_micros: Micros = 0
    list_micros: Micros = 0


def allocate(total: Micros, weights: Sequence[int]) -> list[Micros]:
    """``total`` split over ``weights`` in proportion, in whole units that add up to ``total`` exactly:
    each gets its share rounded down, and what is left goes one unit each to the largest remainders
    (ties to the earlier). All to the first when every weight is 0."""
    if not weights:
        return []
    whole = sum(weights)
    if whole <= 0:
        return [total, *([0] * (len(weights) - 1))]
    shares = [total * w // whole for w in weights]
    left = total - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def _int(fields: Mapping[str, str], name: str) -> int:
    try:
        return max(0, int(fields.get(name) or 0))
    except ValueError:
        return 0


def call_lines(fields: Mapping[str, str], fallback: Price | None) -> list[Line]:
    """The token classes of one logged call, its charge split over them (``allocate``). Prices are the
    ones logged with the call; an entry logged before prices were (or a price missing) takes
    ``fallback`` (the model's price now)."""
    def price(name: str, default: int) -> int:
        return _int(fields, name) if fields.get(name) not in (None, "") else default

    p_in = price("price_input", fallback.input if fallback else 0)
    p_cached = price("price_cached_input", fallback.cached_input if fallback else p_in)
    p_out = price("price_output", fallback.output if fallback else 0)
    prompt, completion = _int(fields, "prompt_tokens"), _int(fields, "completion_tokens")
    cached = min(_int(fields, "cached_tokens"), prompt)
    reasoning = min(_int(fields, "reasoning_tokens"), completion)
    cache_write = min(_int(fields, "cache_write_tokens"), prompt - cached)
    candidates = [
        Line("input", prompt - cached - cache_write, p_in, p_in),
        Line("cached_input", cached, p_in, p_cached),
        # No provider reports cache writes through the OpenAI API yet: charged at the input price.
        Line("cache_write", cache_write, p_in, p_in),
        Line("output", completion - reasoning, p_out, p_out),
        Line("reasoning", reasoning, p_out, p_out),
    ]
    lines = [line for line in candidates if line.quantity > 0]
    charge = _int(fields, "cost_micros")
    if not lines and charge > 0:
        lines = candidates[:1]  # a charge logged without tokens still has a row, so totals stay exact
    shares = allocate(charge, [line.quantity * line.price for line in lines])
    out = []
    for line, share in zip(lines, shares, strict=True):
        listed = -(-line.quantity * line.list_price // TOKENS_PER_PRICE_UNIT)
        out.append(Line(line.token_class, line.quantity, line.list_price, line.price, share,
                        share if line.list_price == line.price else max(share, listed)))
    return out


def _usd(micros: Micros) -> Decimal:
    return Decimal(micros).scaleb(-6)


def _per_token(micros_per_m: int) -> Decimal:
    return Decimal(micros_per_m).scaleb(-12)


def _hour(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 3_600_000 * 3600, UTC)


def _month(at: datetime) -> tuple[datetime, datetime]:
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def focus_rows(tenant: str, call: LoggedCall, config: Config) -> list[Row]:
    """The FOCUS rows of one logged call of ``tenant`` (none when it cost nothing)."""
    f = call.fields
    charge = _int(f, "cost_micros")
    if charge <= 0:
        return []
    model_name = f.get("model") or ""
    model = lookup_model(model_name, config.models) if model_name else None
    external = f.get("outcome") == "external"
    provider = "external" if external else f.get("upstream") or (model.upstream if model else "")
    if external:
        lines = [Line("external", 1, charge, charge, charge, charge)]
    else:
        lines = call_lines(f, model.price if model else None)
    period_start = _hour(call.time_ms)
    billing_start, billing_end = _month(period_start)
    settled_at = datetime.fromtimestamp(call.time_ms / 1000, UTC)
    job = f.get("job") or None
    key = f.get("key") if f.get("key") not in (None, "", "-") else None
    rows = []
    for line in lines:
        unit = "Bookings" if external else "Tokens"
        rows.append({
            "BilledCost": _usd(line.effective_micros), "BillingAccountId": provider, "BillingAccountName": provider,
            "BillingAccountType": "Provider account", "BillingCurrency": "USD",
            "BillingPeriodEnd": billing_end, "BillingPeriodStart": billing_start,
            "ChargeCategory": "Usage", "ChargeClass": None,
            "ChargeDescription": f"{model_name or 'unpriced'} {_CLASS_NAMES[line.token_class]}"
            if not external else f"{_CLASS_NAMES['external']}: {f.get('description', '')}"[:500],
            "ChargeFrequency": "Usage-Based", "ChargePeriodEnd": period_start + timedelta(hours=1),
            "ChargePeriodStart": period_start,
            "ConsumedQuantity": line.quantity, "ConsumedUnit": unit,
            "ContractedCost": _usd(line.list_micros), "ContractedUnitPrice": _per_token(line.list_price)
            if not external else _usd(line.list_price),
            "EffectiveCost": _usd(line.effective_micros), "InvoiceId": None, "InvoiceIssuerName": provider,
            "ListCost": _usd(line.list_micros),
            "ListUnitPrice": _per_token(line.list_price) if not external else _usd(line.list_price),
            "PricingCategory": "Standard", "PricingCurrency": "USD", "PricingQuantity": line.quantity,
            "PricingUnit": unit, "ProviderName": provider, "PublisherName": provider,
            "ResourceId": f.get("request_id") or call.id, "ServiceCategory": "AI and Machine Learning",
            "ServiceName": "LLM API", "ServiceSubcategory": "Generative AI", "SkuId": model_name or None,
            "SkuMeter": _CLASS_NAMES[line.token_class], "SkuPriceDetails": None,
            "SkuPriceId": f"{model_name}:{line.token_class}" if model_name else None,
            "SubAccountId": tenant, "SubAccountName": tenant, "SubAccountType": "Tenant",
            "Tags": orjson.dumps({"job": job} if job else {}).decode(),
            "x_TenantId": tenant, "x_KeyId": key, "x_JobId": job, "x_RequestId": f.get("request_id") or None,
            "x_TokenClass": line.token_class, "x_RequestedModel": f.get("requested_model") or None,
            "x_Outcome": f.get("outcome") or None, "x_BudgetDay": f.get("day") or None, "x_SettledAt": settled_at,
            "x_CostMicros": line.effective_micros,
        })
    return rows


@dataclass
class Export:
    """The rows of an export, and the tenants whose call log no longer reaches back to its start."""

    rows: list[Row] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    @property
    def billed_micros(self) -> Micros:
        return sum(int(r["x_CostMicros"]) for r in self.rows)


async def collect(store: Store, config: Config, tenants: Iterable[str], start: datetime, end: datetime) -> Export:
    """The FOCUS rows of every call of ``tenants`` settled in ``[start, end)``, tenant by tenant, oldest first."""
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    out = Export()
    for tenant in tenants:
        length, oldest_ms = await store.call_log_extent(tenant)
        if oldest_ms is not None and oldest_ms > start_ms and config.store.call_log_size <= length:
            out.incomplete.append(tenant)
        after = None
        while True:
            page = await store.logged_calls(tenant, start_ms, end_ms, after=after, count=PAGE)
            for call in page:
                out.rows.extend(focus_rows(tenant, call, config))
            if len(page) < PAGE:
                break
            after = page[-1].id
    return out


def parse_time(value: str, name: str) -> datetime:
    """``--from``/``--to``: a date (its midnight, UTC) or an ISO 8601 time (UTC if it names no offset)."""
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be a date (2026-12-01) or an ISO 8601 time (2026-12-01T00:00:00Z), "
                         f"got {value[:64]!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def write_csv(rows: Iterable[Row], out: IO[str]) -> None:
    """FOCUS CSV: a header of ``COLUMNS``, empty cells for nulls, times in UTC ISO 8601."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_text(row.get(c)) for c in COLUMNS])


def csv_bytes(rows: Iterable[Row]) -> bytes:
    buffer = io.StringIO()
    write_csv(rows, buffer)
    return buffer.getvalue().encode()


class ParquetUnavailable(RuntimeError):
    """pyarrow is not installed (the ``parquet`` extra)."""


def parquet_bytes(rows: Sequence[Row]) -> bytes:
    """The rows as one Parquet file: costs as decimal(18, 6), unit prices as decimal(24, 12), quantities
    as int64, times as UTC timestamps (ms), the rest as strings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetUnavailable("Parquet needs pyarrow: install guardproxy with the parquet extra "
                                 "(pip install 'guardproxy[parquet]').") from None

    def kind(column: str) -> Any:
        if column in COST_COLUMNS:
            return pa.decimal128(18, 6)
        if column in UNIT_PRICE_COLUMNS:
            return pa.decimal128(24, 12)
        if column in QUANTITY_COLUMNS:
            return pa.int64()
        if column in TIME_COLUMNS:
            return pa.timestamp("ms", tz="UTC")
        return pa.string()

    schema = pa.schema([(c, kind(c)) for c in COLUMNS])
    table = pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
