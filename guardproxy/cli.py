"""The ``guardproxy`` command (contract §8)."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from guardproxy import __version__
from guardproxy.admin import export as export_api
from guardproxy.admin import keys_cli, store_cli
from guardproxy.budget.pricing import MICROS_PER_USD
from guardproxy.config.settings import Config, hash_key, load_config
from guardproxy.config.validation import ConfigError
from guardproxy.observe import logs
from guardproxy.store import copy as store_copy
from guardproxy.store.client import mask_password

MASK = "***"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardproxy", description="An OpenAI-compatible LLM cost guard.")
    parser.add_argument("--version", action="version", version=f"guardproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _config_option(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (sharing the store)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"], help="override server.log_format (default text)")
    serve.add_argument("--access-log", action="store_true", help="also log one line per HTTP request (uvicorn's)")
    serve.add_argument("--log-calls", action=argparse.BooleanOptionalAction, default=None,
                       help="one line per settled call (default: server.log_calls, else on with json, off with text)")

    check = commands.add_parser("check-config", help="validate a config and print it with secrets masked; also "
                                "checks the journal directory, the otel extra and that the store answers")
    _config_option(check)
    check.add_argument("--offline", action="store_true", help="do not try to reach the store")

    hashing = commands.add_parser("hash-key", help="print the sha256: form of an API key for api_keys")
    hashing.add_argument("key")

    status = commands.add_parser("status", help="tenants' budget state, read from the store")
    status.add_argument("tenant", nargs="?", help="one tenant (default: every tenant the config or store knows)")
    status.add_argument("--jobs", type=int, nargs="?", const=20, default=0, metavar="N",
                        help="also list the tenant's N most recently active jobs (default 20)")
    _config_option(status)

    keys_cli.add_parser(commands, _config_option)
    store_copy.add_action(store_cli.add_parser(commands, _config_option))
    export_api.add_parser(commands, _config_option)

    prices = commands.add_parser("prices", help="a model's prices in the genai-prices catalog")
    prices.add_argument("model")
    prices.add_argument("--provider", help="catalog provider id (openai, anthropic, azure, x-ai, ...)")

    demo = commands.add_parser("demo", help="a scripted day of agent traffic against a built-in fake upstream")
    demo.add_argument("--short", action="store_true", help="no pauses between calls")

    args = parser.parse_args(argv)
    if args.command == "hash-key":
        print(hash_key(args.key))
        return 0
    if args.command == "prices":
        return prices_command(args.model, args.provider)
    if args.command == "store" and args.store_command == "copy":  # between two stores: no config
        return store_copy.main(args)
    if args.command == "demo":
        from guardproxy.demo import main as demo_main

        return demo_main(short=args.short)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"guardproxy: config error in {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.command == "keys":
        return keys_cli.main(config, args)
    if args.command == "store":
        return store_cli.main(config, args)
    if args.command == "export":
        return export_api.main(config, args)
    if args.command == "status":
        from guardproxy.admin.status import main as status_main

        return status_main(config, args.tenant, jobs=args.jobs)
    if args.command == "check-config":
        print(yaml.safe_dump(masked(config), sort_keys=False), end="")
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return check_config_command(config, args.config, offline=args.offline)
    return serve_command(config, args)


def check_config_command(config: Config, path: str, *, offline: bool) -> int:
    """What would stop or hurt the proxy with this config, beyond the file itself: 1 when anything does."""
    import anyio

    from guardproxy.admin import preflight

    problems = preflight.local_problems(config)
    if config.store.embedded:
        print("store: embedded (no Redis to reach)", file=sys.stderr)
    elif offline:
        print("store: not checked (--offline)", file=sys.stderr)
    else:
        problem = anyio.run(preflight.store_problem, config)
        if problem is None:
            print(f"store: Redis at {_mask_url(config.store.redis_url)} answers", file=sys.stderr)
        else:
            problems.append(problem)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        return 1
    print(f"{path}: OK", file=sys.stderr)
    return 0


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("GUARDPROXY_CONFIG", "proxy.yaml"),
                        help="path of proxy.yaml (default: $GUARDPROXY_CONFIG or ./proxy.yaml)")


def serve_command(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    from guardproxy.app import CONFIG_ENV, create_app
    from guardproxy.http.slow_clients import uvicorn_config
    from guardproxy.observe.metrics import MULTIPROC_ENV

    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    log_calls = config.server.log_calls if args.log_calls is None else args.log_calls
    log_config = logs.log_config(args.log_format or config.server.log_format, args.log_level, args.access_log,
                                 log_calls)
    logging.config.dictConfig(log_config)
    uvicorn_options: dict[str, Any] = {
        "log_level": args.log_level, "log_config": log_config, "access_log": args.access_log, "proxy_headers": False,
        # The upstream's own date header is dropped and uvicorn adds one; no server banner.
        "server_header": False,
    }
    if args.workers < 1:
        print("guardproxy: --workers must be at least 1", file=sys.stderr)
        return 2
    from guardproxy.admin.preflight import local_problems

    problems = local_problems(config)
    if problems:
        for problem in problems:
            print(f"guardproxy: cannot start: {problem}", file=sys.stderr)
        return 1
    if args.workers > 1:
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
        # Workers keep their counters in files here, summed at scrape time; removed when serve ends.
        metrics_dir = tempfile.mkdtemp(prefix="guardproxy-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            from guardproxy.supervisor import run_workers

            run_workers(uvicorn_config("guardproxy.app:app_from_env", config.server, factory=True, host=host,
                                       port=port, workers=args.workers, **uvicorn_options), models=list(config.models))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    server = uvicorn.Server(uvicorn_config(create_app(config, config_path=args.config), config.server, host=host,
                                           port=port, **uvicorn_options))
    server.run()
    # As uvicorn.run: a start-up that failed (the port taken, the lifespan refused) is exit status 3.
    return 0 if server.started else 3


def prices_command(model: str, provider: str | None) -> int:
    """Print one model's catalog prices, in USD and in the micro-USD the proxy charges with."""
    from guardproxy.budget.pricing import price_to_micros
    from guardproxy.config import prices as price_catalog

    found = price_catalog.lookup(model, provider)
    if found is None:
        where = f" at provider {provider!r}" if provider else ""
        print(f"guardproxy: {price_catalog.CATALOG} {price_catalog.catalog_version()} does not know {model!r}{where}",
              file=sys.stderr)
        return 1
    print(f"{model}: {found.source}")
    for label, value in (("input", found.input), ("cached_input", found.cached_input), ("output", found.output)):
        shown = "-" if value is None else f"{value} USD per 1M tokens ({price_to_micros(value)} micro-USD)"
        print(f"  {label + ':':<14}{shown}")
    if found.tiered_from is not None:
        print(f"  base tier shown; prompts of {found.tiered_from}+ tokens cost more at {found.provider}")
    return 0


def masked(config: Config) -> dict[str, Any]:
    """The resolved config as plain data, every secret replaced by ``***``."""
    usd = MICROS_PER_USD

    def policy(p: Any) -> dict[str, Any]:
        return {"daily_usd": p.daily_micros / usd, "monthly_usd": p.monthly_micros / usd,
                "soft_cap": float(p.soft_cap), "hard_cap": float(p.hard_cap), "timezone": p.timezone,
                "rpm": p.rpm, "tpm": p.tpm,
                "job_usd": None if p.job_micros is None else p.job_micros / usd,
                "cache": "semantic" if p.semantic_cache else p.cache,
                "clamp_max_tokens": p.clamp_max_tokens, "min_completion_tokens": p.min_completion_tokens,
                "loop": None if p.loop is None else vars(p.loop).copy(),
                "velocity": None if p.velocity is None else {
                    "factor": float(p.velocity.factor), "baseline_hours": p.velocity.baseline_hours,
                    "min_usd": p.velocity.min_micros / usd}}

    return {
        "server": {**vars(config.server), "cors_allow_origins": list(config.server.cors_allow_origins)},
        "store": {"url": _mask_url(config.store.url), "synchronous": config.store.synchronous,
                  "key_prefix": config.store.key_prefix,
                  "on_unavailable": config.store.on_unavailable, "call_log_size": config.store.call_log_size,
                  "lease_s": config.store.lease_s, "journal_dir": str(config.store.journal_path()),
                  "min_replica_acks": config.store.min_replica_acks,
                  "replica_ack_timeout_ms": config.store.replica_ack_timeout_ms,
                  "job_retention_days": config.store.job_retention_days},
        "cache": {**vars(config.cache), "semantic": vars(config.cache.semantic).copy()},
        "upstreams": {
            name: {"kind": u.kind, "base_url": u.base_url, "api_key": MASK if u.api_key else "",
                   "api_version": u.api_version, "headers": {k: MASK for k in u.headers},
                   "tenant_header": u.tenant_header, "timeout_s": u.timeout_s, "breaker": vars(u.breaker).copy(),
                   "provider": u.provider}
            for name, u in config.upstreams.items()
        },
        "models": {
            name: {"upstream": m.upstream, "deployment": m.deployment, "input": m.price.input / usd,
                   "cached_input": m.price.cached_input / usd, "output": m.price.output / usd,
                   "price_source": m.price_source,
                   "max_output_tokens": m.max_output_tokens, "downgrade_to": m.downgrade_to,
                   "fallbacks": list(m.fallbacks)}
            for name, m in config.models.items()
        },
        "unbudgeted_paths": config.unbudgeted_paths,
        "unbudgeted_upstream": config.unbudgeted_upstream,
        "budgets": {"defaults": policy(config.defaults)},
        "tenants": {t.id: {"api_keys": [f"sha256:{h[7:15]}..." for h in t.key_hashes], **policy(t.policy)}
                    for t in config.tenants.values()},
        "auth": {"service_keys": [f"sha256:{h[7:15]}..." for h in config.auth.service_key_hashes],
                 "tenant_header": config.auth.tenant_header, "job_header": config.auth.job_header},
        "admin": {"api_key": MASK if config.admin_api_key else ""},
        "servicetitan": config.servicetitan.masked() if config.servicetitan else {},
        "telemetry": {"otlp_endpoint": config.telemetry.otlp_endpoint, "service_name": config.telemetry.service_name,
                      "headers": {k: MASK for k in config.telemetry.headers}},
        "alerts": {
            "thresholds": [float(t) for t in config.alerts.thresholds],
            # a webhook's path and query are its secret (Slack's are)
            "webhooks": [{"url": _webhook_origin(w.url), "format": w.format,
                          "headers": {k: MASK for k in w.headers}, "events": list(w.events)}
                         for w in config.alerts.webhooks],
        },
    }


def _webhook_origin(url: str) -> str:
    """A webhook URL without what may be its secret (credentials, path and query; Slack's path is one)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") + f"/{MASK}"


def _mask_url(url: str) -> str:
    return mask_password(url, MASK)


if __name__ == "__main__":
    raise SystemExit(main())
