"""``proxy.yaml``: typed, validated, immutable configuration (contract §2).

``parse_config`` is pure (the environment is passed in), so tests build as many configs as they like;
``load_config`` reads the file and the process environment.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from guardproxy.budget.levels import KeyBudget, WindowCaps
from guardproxy.budget.policy import BudgetPolicy as BudgetPolicy
from guardproxy.budget.pricing import usd_to_micros
from guardproxy.config.fleet import parse_loop, parse_velocity
from guardproxy.config.levels import check_model_names, parse_key_budgets, parse_model_caps, parse_window_caps

# Upstream and model settings live in ``catalog``; they stay importable from here.
from guardproxy.config.models import BreakerConfig as BreakerConfig
from guardproxy.config.models import ModelConfig as ModelConfig
from guardproxy.config.models import UpstreamConfig as UpstreamConfig
from guardproxy.config.models import parse_models, parse_upstreams
from guardproxy.config.servicetitan import ServiceTitanConfig, parse_servicetitan
from guardproxy.config.store_url import parse_store_url, sqlite_path
from guardproxy.config.validation import ConfigError, Fields, check_range, describe, expand_env, to_decimal
from guardproxy.types import Micros

TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: "$" lets "t\n" through
_HASHED_KEY = re.compile(r"sha256:[0-9a-f]{64}")
_HASH_TAG = re.compile(r"|[A-Za-z0-9._-]{1,64}")
#: What ``unbudgeted_allow_paid`` may name (``objects.PAID``).
PAID_PASSTHROUGH = ("fine_tuning/jobs",)


def hash_key(key: str) -> str:
    """The form of an API key kept in ``api_keys``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    #: ``text`` (for people) or ``json`` (one object per line, for log pipelines); ``--log-format`` wins.
    log_format: str = "text"
    #: One log line per settled call (``guardproxy.observe.calls``); ``None``: on with ``json``, off with ``text``
    #: (the audit log in the store has every call; a line per call costs ~0.15 ms of CPU).
    log_calls: bool | None = None
    #: Browser origins allowed to call the proxy (CORS); empty: no CORS headers at all.
    cors_allow_origins: tuple[str, ...] = ()
    #: ``/metrics`` has budget gauges for the configured tenants and the most recently active others,
    #: at most this many tenants in all (a scrape reads each of them from the store).
    metrics_max_tenants: int = 250
    #: Slow clients (``guardproxy.http.slow_clients``), per worker process: open connections beyond
    #: ``max_connections`` are answered 503 and closed; a request head must arrive whole within
    #: ``header_timeout_s`` of the connection (or the previous answer), and be at most
    #: ``max_header_bytes``; a body within ``body_timeout_s`` of its head; an idle keep-alive
    #: connection is closed after ``keep_alive_timeout_s``.
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 64 * 1024
    #: ``usage.cost`` (USD) in answers and final stream chunks; off for clients that refuse unknown
    #: fields (the ``x-guardproxy-cost-usd`` header is always sent).
    usage_cost: bool = True


@dataclass(frozen=True)
class StoreConfig:
    redis_url: str = ""
    #: The SQLite store's file when ``redis_url`` is empty; empty: ``sqlite_path()``'s default.
    sqlite_file: str = ""
    #: The SQLite store's ``PRAGMA synchronous``: ``normal`` (a power cut may lose the last commits) or
    #: ``full`` (every commit synced to disk); docs/store.md.
    synchronous: str = "normal"
    key_prefix: str = "gp"
    on_unavailable: str = "fail_closed"
    #: Settled calls kept per tenant for the admin API's audit log (0: none).
    call_log_size: int = 1000
    #: How long a reservation holds without renewal; the process running the call renews it every
    #: third of this, so a crashed process's reservations free within one lease.
    lease_s: float = 30.0
    #: Where charges that cannot be written to the store wait on disk; empty: ``default_journal_dir()``.
    journal_dir: str = ""
    #: Replicas that must confirm each settlement (Redis ``WAIT``) before it counts as written; fewer
    #: confirmations within ``replica_ack_timeout_ms`` count as "store unavailable" for that charge.
    min_replica_acks: int = 0
    replica_ack_timeout_ms: int = 500
    #: How long a job's (work order's) counters are kept after its last call.
    job_retention_days: int = 90
    #: A Redis whose ``maxmemory-policy`` is not ``noeviction`` may evict spend counters: ``refuse``
    #: admissions (503) until it is fixed, or only ``warn`` (log, ``/readyz``, metric, alert).
    on_evicting_policy: str = "refuse"
    #: Tenants seen only through a service key leave the tenant index after this many idle days.
    tenant_retention_days: int = 62
    #: The tenant index keeps at most this many tenants (the most recently active).
    tenant_index_max: int = 100_000
    #: Behind Sentinel, settlements the primary took are kept this long and written again to a new
    #: primary after a failover (a former primary keeps acknowledging writes that the new one never
    #: sees); the settled markers make the ones it has harmless. 0: never replayed.
    replay_window_s: float = 30.0
    #: One Redis Cluster hash tag for every tenant's ledger keys (``""``: each tenant its own), so that
    #: ``budgets.global`` is checked atomically with the tenant's keys; required with ``budgets.global``
    #: on a cluster (all budget keys then live on one shard).
    hash_tag: str = ""

    @property
    def embedded(self) -> bool:
        """The SQLite store (no Redis URL)."""
        return not self.redis_url

    @property
    def url(self) -> str:
        """The store as one URL: the Redis URL, else ``sqlite:///<file>``."""
        return self.redis_url or f"sqlite://{self.sqlite_path()}"

    def sqlite_path(self) -> Path:
        """The SQLite store's file: ``sqlite_file``, else ``$XDG_STATE_HOME/guardproxy/spend.db``, else
        ``~/.local/state/guardproxy/spend.db`` (read from the environment when called)."""
        if self.sqlite_file:
            return Path(self.sqlite_file)
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "guardproxy" / "spend.db"

    def journal_path(self) -> Path:
        """The journal directory: ``journal_dir``, else ``$XDG_STATE_HOME/guardproxy/journal``, else
        ``~/.local/state/guardproxy/journal`` (read from the environment when called)."""
        if self.journal_dir:
            return Path(self.journal_dir)
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "guardproxy" / "journal"

    @property
    def fail_open(self) -> bool:
        return self.on_unavailable == "fail_open"


@dataclass(frozen=True)
class TenantConfig:
    id: str
    key_hashes: tuple[str, ...]
    policy: BudgetPolicy
    #: Budgets of the tenant's config keys, by key digest (``api_key_budgets``).
    key_budgets: Mapping[str, KeyBudget] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthConfig:
    service_key_hashes: tuple[str, ...] = ()
    tenant_header: str = "X-Tenant-Id"
    job_header: str = "X-ServiceTitan-Job-Id"


#: ``store``: the budget store cannot be trusted (``store_health``: evicting policy, a reset); ``loop`` and
#: ``velocity``: the fleet brakes (``budget/fleet.py``).
ALERT_EVENTS = ("threshold", "downgrading", "blocked", "store", "loop", "velocity")


@dataclass(frozen=True)
class SemanticCacheConfig:
    """The semantic cache (``http/semantic.py``); tenants switch it on with ``cache: semantic``."""

    #: A configured embeddings model: each question embedded is an embeddings call charged to the tenant.
    embeddings_model: str = "text-embedding-3-small"
    #: Sent as the embeddings request's ``dimensions`` (text-embedding-3-* shorten their vectors to it);
    #: an answer of another length is not used.
    dimensions: int = 256
    #: The least similarity (dot product of normalised embeddings) of a hit; docs/semantic-cache.md
    #: says how to calibrate it for a model.
    threshold: float = 0.92
    #: Entries kept per tenant (the oldest dropped first); each replica holds their vectors in memory.
    max_entries: int = 2000
    #: The longest conversation considered, in messages.
    max_messages: int = 4


@dataclass(frozen=True)
class CacheConfig:
    """The response cache (``cache.py``); tenants switch it on with ``cache: true``."""

    ttl_s: int = 3600
    #: Answers larger than this are not cached.
    max_entry_bytes: int = 1024 * 1024
    #: Cached bytes one tenant may hold; past it, its oldest entries go first.
    max_tenant_bytes: int = 16 * 1024 * 1024
    #: Cached bytes of all tenants together; past it, new answers are not cached until entries expire.
    max_total_bytes: int = 256 * 1024 * 1024
    semantic: SemanticCacheConfig = field(default_factory=SemanticCacheConfig)


@dataclass(frozen=True)
class WebhookConfig:
    """One receiver of alert events."""

    url: str
    #: ``slack`` ({"text": one line}) or ``json`` (the event object).
    format: str = "json"
    headers: Mapping[str, str] = field(default_factory=dict)
    events: tuple[str, ...] = ALERT_EVENTS


@dataclass(frozen=True)
class AlertsConfig:
    webhooks: tuple[WebhookConfig, ...] = ()
    #: Shares of the day's and month's limit whose crossing fires a ``threshold`` event.
    thresholds: tuple[Decimal, ...] = (Decimal("0.5"), Decimal("0.75"), Decimal("0.9"), Decimal("1.0"))

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks)

    def thresholds_ppm(self) -> tuple[int, ...]:
        """The thresholds in parts per million, as the settle script takes them (none while disabled)."""
        return tuple(int(t * 1_000_000) for t in self.thresholds) if self.enabled else ()


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry tracing (``guardproxy[otel]``): off while ``otlp_endpoint`` is empty."""

    #: OTLP/HTTP base URL (``http://collector:4318``) or full traces URL (``…/v1/traces``).
    otlp_endpoint: str = ""
    #: Sent with every export (a Langfuse or Helicone key, say).
    headers: Mapping[str, str] = field(default_factory=dict)
    service_name: str = "guardproxy"

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


def _telemetry(f: Fields) -> TelemetryConfig:
    endpoint = f.text("otlp_endpoint", "").rstrip("/")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f.at("otlp_endpoint"), f"must be an http:// or https:// URL, got {describe(endpoint)}")
    out = TelemetryConfig(otlp_endpoint=endpoint, headers=f.text_map("headers"),
                          service_name=f.text("service_name", TelemetryConfig.service_name, allow_empty=False))
    f.done()
    return out


@dataclass(frozen=True)
class BatchConfig:
    """The budgeted Batch API (``batches.py``)."""

    #: How often open batches are asked upstream whether they ended (each one is settled then).
    poll_s: float = 60.0
    #: The largest batch input file read to price its worst case (OpenAI takes up to 200 MB).
    max_input_bytes: int = 200 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    store: StoreConfig
    upstreams: Mapping[str, UpstreamConfig]
    models: Mapping[str, ModelConfig]
    defaults: BudgetPolicy
    tenants: Mapping[str, TenantConfig]
    auth: AuthConfig
    admin_api_key: str
    servicetitan: ServiceTitanConfig | None
    #: What other ``/v1/*`` paths get: ``reject`` (404) or ``passthrough`` (forwarded, unbudgeted).
    unbudgeted_paths: str = "reject"
    #: The upstream that passed-through paths go to.
    unbudgeted_upstream: str = ""
    #: Money-bearing objects that passthrough may create without a budget (``fine_tuning/jobs``);
    #: refused (403) unless named here. Batches always go through the budgeted path (``batches.py``).
    unbudgeted_allow_paid: tuple[str, ...] = ()
    #: Things worth a start-up warning (plain API keys in the file); never contain a secret.
    warnings: tuple[str, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    batches: BatchConfig = field(default_factory=BatchConfig)
    #: ``budgets.global``: caps over every tenant together, in UTC periods (the operator's bill).
    global_caps: WindowCaps = field(default_factory=WindowCaps)

    def downgrade_chain(self, model: ModelConfig) -> list[ModelConfig]:
        """``model`` followed by each cheaper tier it names, in order."""
        chain = [model]
        while chain[-1].downgrade_to is not None:
            chain.append(self.models[chain[-1].downgrade_to])
        return chain

    def route(self, model: ModelConfig) -> list[ModelConfig]:
        """``model`` followed by its fallbacks: the models tried, in order, while upstreams fail."""
        return [model, *(self.models[name] for name in model.fallbacks)]

    def policy_for(self, tenant: str) -> BudgetPolicy:
        entry = self.tenants.get(tenant)
        return entry.policy if entry else self.defaults


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ``ConfigError`` naming the field at fault."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config_bytes(data, path, env)


def parse_config_bytes(data: bytes, path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Validate the bytes of a config file (read once by the caller, who may hash them too)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not UTF-8 text: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse_config(raw, os.environ if env is None else env)


def parse_config(raw: Any, env: Mapping[str, str]) -> Config:
    """Validate a parsed YAML document into a ``Config``."""
    top = Fields(expand_env(raw, env), "")
    warnings: list[str] = []
    server = _server(top.section("server"))
    store = _store(top.section("store"))
    upstreams = parse_upstreams(top.section("upstreams"))
    warnings.extend(
        f"upstreams.{name} has no api_key: requests go to it without any credential (right for a keyless "
        "local server such as vLLM or Ollama; set api_key for a provider)"
        for name, upstream in upstreams.items() if not upstream.api_key
    )
    models = parse_models(top.section("models"), upstreams, warnings)
    budgets = top.section("budgets")
    defaults_fields = budgets.section("defaults")
    defaults = merge_policy(defaults_fields, BUILTIN_DEFAULTS)
    defaults_fields.done()
    global_caps = parse_window_caps(budgets.section("global"))
    budgets.done()
    if global_caps and store.redis_url and parse_store_url(store.redis_url).kind == "cluster" and not store.hash_tag:
        raise ConfigError("budgets.global", "on Redis Cluster the global cap needs store.hash_tag (one hash tag "
                          "for every tenant's ledger keys, so that the global cap is checked atomically); "
                          "see docs/budgets.md")
    tenants = _tenants(top.section("tenants"), defaults, warnings)
    auth = _auth(top.section("auth"), tenants, warnings)
    check_model_names("budgets.defaults.models", [m for m, _ in defaults.model_caps], models)
    for t in tenants.values():
        check_model_names(f"tenants.{t.id}.models", [m for m, _ in t.policy.model_caps], models)
        for budget in t.key_budgets.values():
            check_model_names(f"tenants.{t.id}.api_key_budgets.models", list(budget.models), models)
    admin = top.section("admin")
    admin_api_key = admin.text("api_key", "")
    admin.done()
    servicetitan = parse_servicetitan(top.get("servicetitan"), "servicetitan")
    unbudgeted_paths = top.text("unbudgeted_paths", "reject", choices=("reject", "passthrough"))
    telemetry = _telemetry(top.section("telemetry"))
    unbudgeted_upstream = top.text("unbudgeted_upstream", next(iter(upstreams)), allow_empty=False)
    if unbudgeted_upstream not in upstreams:
        raise ConfigError("unbudgeted_upstream", f"names no configured upstream (have: {', '.join(upstreams)})")
    allow_paid = tuple(top.text_list("unbudgeted_allow_paid"))
    for i, name in enumerate(allow_paid):
        if name not in PAID_PASSTHROUGH:
            raise ConfigError(f"unbudgeted_allow_paid[{i}]", f"must be one of {', '.join(PAID_PASSTHROUGH)}, "
                              f"got {describe(name)}")
    alerts = _alerts(top.section("alerts"))
    cache = _cache(top.section("cache"), models, [defaults, *(t.policy for t in tenants.values())])
    batch_fields = top.section("batches")
    batches = BatchConfig(
        poll_s=float(batch_fields.decimal("poll_s", Decimal(str(BatchConfig.poll_s)), min_value=Decimal("0.05"),
                                          max_value=Decimal(86400))),
        max_input_bytes=batch_fields.integer("max_input_bytes", BatchConfig.max_input_bytes, min_value=1),
    )
    batch_fields.done()
    top.done()
    return Config(
        server=server, store=store, upstreams=upstreams, models=models, defaults=defaults,
        tenants=tenants, auth=auth, admin_api_key=admin_api_key, servicetitan=servicetitan,
        unbudgeted_paths=unbudgeted_paths, unbudgeted_upstream=unbudgeted_upstream,
        unbudgeted_allow_paid=allow_paid, warnings=tuple(warnings),
        telemetry=telemetry,
        alerts=alerts, cache=cache, batches=batches, global_caps=global_caps,
    )


def _cors_origins(f: Fields) -> tuple[str, ...]:
    """``server.cors_allow_origins``: exact origins (``https://app.example.com``) or ``*``."""
    origins = f.text_list("cors_allow_origins")
    for i, origin in enumerate(origins):
        if origin != "*" and (not origin.startswith(("http://", "https://")) or origin.endswith("/")):
            raise ConfigError(f"{f.at('cors_allow_origins')}[{i}]", "must be an origin such as "
                              f"https://app.example.com (no path) or *, got {describe(origin)}")
    return tuple(origins)


def _cache(f: Fields, models: Mapping[str, ModelConfig], policies: list[BudgetPolicy]) -> CacheConfig:
    out = CacheConfig(
        ttl_s=f.integer("ttl_s", CacheConfig.ttl_s, min_value=1, max_value=365 * 86400),
        max_entry_bytes=f.integer("max_entry_bytes", CacheConfig.max_entry_bytes, min_value=1,
                                  max_value=512 * 1024 * 1024),
        max_tenant_bytes=f.integer("max_tenant_bytes", CacheConfig.max_tenant_bytes, min_value=1,
                                   max_value=1 << 40),
        max_total_bytes=f.integer("max_total_bytes", CacheConfig.max_total_bytes, min_value=1, max_value=1 << 42),
        semantic=_semantic_cache(f.section("semantic"), models, any(p.semantic_cache for p in policies)),
    )
    f.done()
    return out


def _semantic_cache(f: Fields, models: Mapping[str, ModelConfig], used: bool) -> SemanticCacheConfig:
    d = SemanticCacheConfig
    out = SemanticCacheConfig(
        embeddings_model=f.text("embeddings_model", d.embeddings_model, allow_empty=False),
        dimensions=f.integer("dimensions", d.dimensions, min_value=1, max_value=8192),
        threshold=float(f.decimal("threshold", Decimal(str(d.threshold)), min_value=Decimal("0.5"),
                                  max_value=Decimal(1))),
        max_entries=f.integer("max_entries", d.max_entries, min_value=1, max_value=1_000_000),
        max_messages=f.integer("max_messages", d.max_messages, min_value=1, max_value=1000),
    )
    if used and out.embeddings_model not in models:
        raise ConfigError(f.at("embeddings_model"), f"names no configured model ({out.embeddings_model!r}); a tenant "
                          "has cache: semantic, whose embeddings are priced and charged like any call: add the "
                          "model under models")
    f.done()
    return out


def _alerts(f: Fields) -> AlertsConfig:
    hooks = f.get("webhooks", [])
    if not isinstance(hooks, list):
        raise ConfigError(f.at("webhooks"), f"must be a list of webhooks, got {describe(hooks)}")
    webhooks = []
    for i, raw in enumerate(hooks):
        w = Fields(raw, f"{f.at('webhooks')}[{i}]")
        url = w.text("url", "", allow_empty=False)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(w.at("url"), f"must be an http:// or https:// URL, got {describe(url)}")
        events = tuple(w.text_list("events")) if w.has("events") else ALERT_EVENTS
        for event in events:
            if event not in ALERT_EVENTS:
                raise ConfigError(w.at("events"), f"unknown event {event!r} (known: {', '.join(ALERT_EVENTS)})")
        webhooks.append(WebhookConfig(url=url, format=w.text("format", "json", choices=("json", "slack")),
                                      headers=w.text_map("headers"), events=events))
        w.done()
    thresholds = AlertsConfig.thresholds
    if f.has("thresholds"):
        raw_thresholds = f.get("thresholds")
        if not isinstance(raw_thresholds, list) or not raw_thresholds:
            raise ConfigError(f.at("thresholds"), "must be a non-empty list of shares such as [0.75, 0.9]")
        values = []
        for i, value in enumerate(raw_thresholds):
            share = to_decimal(f"{f.at('thresholds')}[{i}]", value)
            check_range(f"{f.at('thresholds')}[{i}]", share, Decimal("0.000001"), Decimal(10))
            values.append(share.quantize(Decimal("0.000001")))
        thresholds = tuple(sorted(set(values)))
    f.done()
    return AlertsConfig(webhooks=tuple(webhooks), thresholds=thresholds)


def _server(f: Fields) -> ServerConfig:
    out = ServerConfig(
        host=f.text("host", ServerConfig.host, allow_empty=False),
        port=f.integer("port", ServerConfig.port, min_value=0, max_value=65535),
        max_body_bytes=f.integer("max_body_bytes", ServerConfig.max_body_bytes, min_value=1),
        log_format=f.text("log_format", ServerConfig.log_format, choices=("text", "json")),
        log_calls=f.boolean("log_calls", False) if f.has("log_calls") else None,
        cors_allow_origins=_cors_origins(f),
        metrics_max_tenants=f.integer("metrics_max_tenants", ServerConfig.metrics_max_tenants, min_value=0,
                                      max_value=1_000_000),
        max_connections=f.integer("max_connections", ServerConfig.max_connections, min_value=1, max_value=1_000_000),
        header_timeout_s=_seconds(f, "header_timeout_s", ServerConfig.header_timeout_s),
        body_timeout_s=_seconds(f, "body_timeout_s", ServerConfig.body_timeout_s),
        keep_alive_timeout_s=_seconds(f, "keep_alive_timeout_s", ServerConfig.keep_alive_timeout_s),
        max_header_bytes=f.integer("max_header_bytes", ServerConfig.max_header_bytes, min_value=1024,
                                   max_value=16 * 1024 * 1024),
        usage_cost=f.boolean("usage_cost", ServerConfig.usage_cost),
    )
    f.done()
    return out


def _seconds(f: Fields, key: str, default: float) -> float:
    return float(f.decimal(key, Decimal(str(default)), min_value=Decimal("0.1"), max_value=Decimal(3600)))


def _store(f: Fields) -> StoreConfig:
    url = f.text("redis_url", "")
    field = "redis_url"
    sqlite_file = ""
    if f.has("url"):
        if url:
            raise ConfigError(f.at("url"), "set store.url or store.redis_url, not both")
        url, field = f.text("url", ""), "url"
        if url.startswith("sqlite:"):
            try:
                sqlite_file, url = str(sqlite_path(url)), ""
            except ValueError as exc:
                raise ConfigError(f.at("url"), str(exc)) from None
    kind = ""
    if url:
        try:
            kind = parse_store_url(url).kind
        except ValueError as exc:
            raise ConfigError(f.at(field), f"{exc} (or sqlite:///path for the SQLite store)") from None
    # Behind Sentinel a failover must not drop acknowledged charges: one replica confirms each by default.
    acks = f.integer("min_replica_acks", 1 if kind == "sentinel" else 0, min_value=0, max_value=16)
    if acks and kind in ("", "cluster"):
        raise ConfigError(f.at("min_replica_acks"), "works with redis:// and redis+sentinel:// URLs only; on Redis "
                          "Cluster set min-replicas-to-write on the shards instead (deploy/README.md)")
    out = StoreConfig(
        redis_url=url,
        sqlite_file=sqlite_file,
        synchronous=f.text("synchronous", StoreConfig.synchronous, choices=("normal", "full")),
        key_prefix=f.text("key_prefix", StoreConfig.key_prefix, allow_empty=False),
        on_unavailable=f.text("on_unavailable", StoreConfig.on_unavailable, choices=("fail_closed", "fail_open")),
        call_log_size=f.integer("call_log_size", StoreConfig.call_log_size, min_value=0, max_value=1_000_000),
        lease_s=float(f.decimal("lease_s", Decimal(str(StoreConfig.lease_s)), min_value=Decimal("0.3"),
                                max_value=Decimal(86400))),
        journal_dir=f.text("journal_dir", StoreConfig.journal_dir),
        min_replica_acks=acks,
        replica_ack_timeout_ms=f.integer("replica_ack_timeout_ms", StoreConfig.replica_ack_timeout_ms,
                                         min_value=1, max_value=60_000),
        job_retention_days=f.integer("job_retention_days", StoreConfig.job_retention_days, min_value=1,
                                     max_value=3650),
        on_evicting_policy=f.text("on_evicting_policy", StoreConfig.on_evicting_policy, choices=("refuse", "warn")),
        tenant_retention_days=f.integer("tenant_retention_days", StoreConfig.tenant_retention_days, min_value=1,
                                        max_value=3650),
        tenant_index_max=f.integer("tenant_index_max", StoreConfig.tenant_index_max, min_value=1,
                                   max_value=100_000_000),
        replay_window_s=float(f.decimal("replay_window_s", Decimal(str(StoreConfig.replay_window_s)),
                                        min_value=Decimal(0), max_value=Decimal(3600))),
        hash_tag=f.text("hash_tag", StoreConfig.hash_tag),
    )
    if not _HASH_TAG.fullmatch(out.hash_tag):
        raise ConfigError(f.at("hash_tag"), "must be 1-64 letters, digits, '.', '_' or '-' (or empty for none)")
    if "{" in out.key_prefix or "}" in out.key_prefix:
        raise ConfigError(f.at("key_prefix"), "must not contain { or } (keys carry the tenant as hash tag)")
    f.done()
    return out


BUILTIN_DEFAULTS = BudgetPolicy(
    daily_micros=100_000_000, monthly_micros=2_000_000_000, soft_cap=Decimal("0.8"), hard_cap=Decimal("1.0"),
    timezone="UTC",
)


def merge_policy(f: Fields, base: BudgetPolicy) -> BudgetPolicy:
    """A policy where every field ``f`` leaves out comes from ``base``."""
    zero = Decimal(0)

    def money(key: str, fallback: Micros) -> Micros:
        return usd_to_micros(f.decimal(key, None, min_value=zero)) if f.has(key) else fallback

    soft = f.decimal("soft_cap", base.soft_cap, min_value=zero)
    hard = f.decimal("hard_cap", base.hard_cap, min_value=Decimal("0.000001"))
    if soft > hard:
        raise ConfigError(f.at("soft_cap"), f"must not exceed hard_cap ({hard}), got {soft}")
    tz = f.text("timezone", base.timezone, allow_empty=False)
    cache = _cache_mode(f, "semantic" if base.semantic_cache else "exact" if base.cache else "off")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f.at("timezone"), f"is not an IANA timezone name: {describe(tz)}") from None
    return BudgetPolicy(
        daily_micros=money("daily_usd", base.daily_micros),
        monthly_micros=money("monthly_usd", base.monthly_micros),
        soft_cap=soft, hard_cap=hard, timezone=tz,
        rpm=f.integer("rpm", base.rpm, min_value=0, max_value=10_000_000),
        tpm=f.integer("tpm", base.tpm, min_value=0, max_value=10**12),
        job_micros=_job_cap(f, base.job_micros),
        cache=cache != "off",
        semantic_cache=cache == "semantic",
        clamp_max_tokens=f.boolean("clamp_max_tokens", base.clamp_max_tokens),
        min_completion_tokens=f.integer("min_completion_tokens", base.min_completion_tokens, min_value=1),
        loop=parse_loop(f, "loop", base.loop),
        velocity=parse_velocity(f, "velocity", base.velocity),
        hourly_micros=_optional_money(f, "hourly_usd", base.hourly_micros),
        weekly_micros=_optional_money(f, "weekly_usd", base.weekly_micros),
        model_caps=parse_model_caps(f, "models", base.model_caps),
    )


def _optional_money(f: Fields, key: str, base: Micros | None) -> Micros | None:
    """An optional cap in USD: left out, the base's; null, none."""
    if not f.has(key):
        return base
    if f.get(key) is None:
        return None
    return usd_to_micros(f.decimal(key, None, min_value=Decimal(0)))


def _cache_mode(f: Fields, base: str) -> str:
    """``cache``: false (``off``), true (``exact``: the response cache) or ``semantic`` (both caches)."""
    value = f.get("cache")
    if value is None and not f.has("cache"):
        return base
    if value is True or value is False:
        return "exact" if value else "off"
    if value == "semantic":
        return "semantic"
    raise ConfigError(f.at("cache"), f"must be true, false or semantic, got {describe(value)}")


def _job_cap(f: Fields, base: Micros | None) -> Micros | None:
    """``job_usd``: a cap per job in USD, or null for none."""
    if not f.has("job_usd"):
        return base
    if f.get("job_usd") is None:
        return None
    return usd_to_micros(f.decimal("job_usd", None, min_value=Decimal(0)))


def _key_hashes(f: Fields, key: str, warnings: list[str]) -> tuple[str, ...]:
    hashes = []
    for i, value in enumerate(f.text_list(key)):
        if _HASHED_KEY.fullmatch(value):
            hashes.append(value)
        elif value.startswith("sha256:"):
            raise ConfigError(f"{f.at(key)}[{i}]", "sha256: must be followed by 64 lowercase hex digits")
        elif not value:
            raise ConfigError(f"{f.at(key)}[{i}]", "must not be empty")
        else:
            warnings.append(f"{f.at(key)}[{i}] is a plain key; store it as `guardproxy hash-key` prints it")
            hashes.append(hash_key(value))
    return tuple(hashes)


def _tenants(f: Fields, defaults: BudgetPolicy, warnings: list[str]) -> dict[str, TenantConfig]:
    out: dict[str, TenantConfig] = {}
    owner: dict[str, str] = {}
    for tenant_id in list(f.raw):
        if not TENANT_ID.fullmatch(tenant_id):
            raise ConfigError(f.at(tenant_id), "tenant ids must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
        t = f.section(tenant_id)
        hashes = _key_hashes(t, "api_keys", warnings)
        for h in hashes:
            if h in owner:
                raise ConfigError(t.at("api_keys"), f"a key is listed for tenant {owner[h]!r} too")
            owner[h] = tenant_id
        policy = merge_policy(t, defaults)
        key_budgets = parse_key_budgets(t.section("api_key_budgets"), hashes)
        out[tenant_id] = TenantConfig(id=tenant_id, key_hashes=hashes, policy=policy, key_budgets=key_budgets)
        t.done()
    f.done()
    return out


def _auth(f: Fields, tenants: Mapping[str, TenantConfig], warnings: list[str]) -> AuthConfig:
    service = _key_hashes(f, "service_keys", warnings)
    tenant_keys = {h for t in tenants.values() for h in t.key_hashes}
    if tenant_keys.intersection(service):
        raise ConfigError(f.at("service_keys"), "a service key is also listed as a tenant key")
    out = AuthConfig(
        service_key_hashes=service,
        tenant_header=f.text("tenant_header", AuthConfig.tenant_header, allow_empty=False),
        job_header=f.text("job_header", AuthConfig.job_header, allow_empty=False),
    )
    f.done()
    return out
