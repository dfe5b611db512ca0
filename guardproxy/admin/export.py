"""The chargeback export's two doors: ``guardproxy export`` and ``GET /admin/export`` (``observe/export.py``).

Both take a period ``[from, to)`` (dates are their UTC midnight), a format (``csv`` or ``parquet``)
and optionally tenants (default: every tenant the config or the store knows), and answer FOCUS 1.2
rows. A tenant whose call log no longer reaches back to ``from`` is named: on stderr by the command
(exit status 3), in the ``x-guardproxy-export-incomplete`` header by the API.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.admin.auth import check_admin
from guardproxy.budget.pricing import format_usd
from guardproxy.config.settings import Config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.http import app_state
from guardproxy.http.auth import valid_tenant
from guardproxy.observe.export import FORMATS, Export, ParquetUnavailable, collect, csv_bytes, parquet_bytes, parse_time
from guardproxy.observe.state import all_tenants
from guardproxy.store.redis import BudgetStore

#: The longest period one export may cover.
MAX_PERIOD_DAYS = 400
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


def period(start: str, end: str) -> tuple[datetime, datetime]:
    """``[from, to)`` from their text; ``ValueError`` saying what is wrong."""
    since, until = parse_time(start, "from"), parse_time(end, "to")
    if until <= since:
        raise ValueError("to must be later than from")
    if (until - since).days > MAX_PERIOD_DAYS:
        raise ValueError(f"one export covers at most {MAX_PERIOD_DAYS} days")
    return since, until


def encode(export: Export, format_: str) -> bytes:
    return csv_bytes(export.rows) if format_ == "csv" else parquet_bytes(export.rows)


# -- GET /admin/export ----------------------------------------------------------------------------


async def get_export(request: Request) -> Response:
    """``?from=&to=&format=csv|parquet&tenant=`` (``tenant`` repeatable; default every tenant)."""
    services = app_state.services(request)
    check_admin(request, services)
    query = request.query_params
    format_ = query.get("format", "csv")
    if format_ not in FORMATS:
        raise GuardError(ErrorKind.INVALID_FIELD, f"format must be one of {', '.join(FORMATS)}.", param="format")
    if "from" not in query or "to" not in query:
        missing = "from" if "from" not in query else "to"
        raise GuardError(ErrorKind.MISSING_FIELD, f"{missing} is required (a date such as 2026-12-01, or an ISO "
                         "8601 time).", param=missing)
    try:
        since, until = period(query["from"], query["to"])
    except ValueError as exc:
        raise GuardError(ErrorKind.INVALID_FIELD, f"Invalid period: {exc}.", param="from") from None
    store = services.ledger.store
    tenants = [valid_tenant(t) for t in query.getlist("tenant")] or await all_tenants(store, services.config)
    export = await collect(store, services.config, tenants, since, until)
    try:
        body = encode(export, format_)
    except ParquetUnavailable as exc:
        raise GuardError(ErrorKind.INVALID_FIELD, str(exc), param="format") from None
    name = f"guardproxy-focus-{since:%Y%m%dT%H%M%SZ}-{until:%Y%m%dT%H%M%SZ}.{format_}"
    headers = {"content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store",
               "x-guardproxy-export-rows": str(len(export.rows)),
               "x-guardproxy-export-billed-micros": str(export.billed_micros)}
    if export.incomplete:
        headers["x-guardproxy-export-incomplete"] = ",".join(export.incomplete)
    return Response(body, media_type=MEDIA_TYPES[format_], headers=headers)


def export_routes() -> list[Route]:
    return [Route("/admin/export", get_export, methods=["GET"])]


# -- guardproxy export ----------------------------------------------------------------------------


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    export = commands.add_parser("export", help="chargeback: calls as FinOps FOCUS 1.2 rows (csv or parquet)")
    export.add_argument("--from", dest="since", required=True, help="start (a date, its UTC midnight, or ISO time)")
    export.add_argument("--to", dest="until", required=True, help="end, exclusive (a date or ISO time)")
    export.add_argument("--format", choices=FORMATS, default="csv")
    export.add_argument("--tenant", action="append", default=[], help="only this tenant (repeatable)")
    export.add_argument("--output", "-o", help="file to write (default: stdout for csv; required for parquet)")
    config_option(export)


async def _collect(config: Config, tenants: Sequence[str], since: datetime, until: datetime) -> Export:
    store = BudgetStore.from_config(config.store)
    try:
        return await collect(store, config, list(tenants) or await all_tenants(store, config), since, until)
    finally:
        await store.aclose()


def main(config: Config, args: argparse.Namespace) -> int:
    """Write the export; 0 when complete, 3 when a tenant's call log no longer reaches ``--from``."""
    try:
        since, until = period(args.since, args.until)
        for tenant in args.tenant:
            valid_tenant(tenant)
    except (ValueError, GuardError) as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 2
    if args.format == "parquet" and not args.output:
        print("guardproxy: --format parquet needs --output FILE", file=sys.stderr)
        return 2
    try:
        export = asyncio.run(_collect(config, args.tenant, since, until))
        body = encode(export, args.format)
    except (StoreUnavailable, ParquetUnavailable) as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_bytes(body)
    else:
        sys.stdout.write(body.decode())
        sys.stdout.flush()
    print(f"{len(export.rows)} rows, ${format_usd(export.billed_micros)} billed", file=sys.stderr)
    for tenant in export.incomplete:
        print(f"warning: tenant {tenant}'s call log no longer reaches back to {args.since} (it keeps "
              "store.call_log_size entries): the export misses its older calls", file=sys.stderr)
    return 3 if export.incomplete else 0
