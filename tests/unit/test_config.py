"""parse_config / load_config: defaults, validation errors naming the exact field, env expansion."""

from __future__ import annotations

import copy
import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from guardproxy.budget.pricing import Price
from guardproxy.config.settings import BUILTIN_DEFAULTS, Config, hash_key, load_config, parse_config
from guardproxy.config.validation import ConfigError
from tests.helpers import minimal

REPO_ROOT = Path(__file__).resolve().parents[2]
HEX_A = "a" * 64
HEX_B = "b" * 64


def with_changes(**sections: Any) -> dict[str, Any]:
    raw = minimal()
    raw.update(copy.deepcopy(sections))
    return raw


def error_of(raw: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value


# --- a minimal config and its defaults --------------------------------------------------------


def test_minimal_config_parses() -> None:
    config = parse_config(minimal(), {})
    assert isinstance(config, Config)
    assert list(config.upstreams) == ["openai"]
    assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
    model = config.models["gpt-4o"]
    assert model.upstream == "openai"  # the only upstream is the default
    assert model.price == Price(input=2_500_000, cached_input=1_250_000, output=10_000_000)
    assert model.max_output_tokens == 16384
    assert model.downgrade_to is None
    assert config.tenants == {}
    assert config.servicetitan is None
    assert config.warnings == ()


def test_server_and_store_defaults() -> None:
    config = parse_config(minimal(), {})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 10_485_760
    assert config.store.redis_url == ""
    assert config.store.embedded is True
    assert config.store.key_prefix == "gp"
    assert config.store.on_unavailable == "fail_closed"
    assert config.store.fail_open is False
    assert config.store.lease_s == 30.0
    assert config.store.journal_dir == ""
    assert config.admin_api_key == ""
    assert config.auth.service_key_hashes == ()
    assert config.auth.tenant_header == "X-Tenant-Id"
    assert config.auth.job_header == "X-ServiceTitan-Job-Id"


def test_upstream_defaults_and_trailing_slash() -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "http://localhost:9000/v1/"}})
    upstream = parse_config(raw, {}).upstreams["openai"]
    assert upstream.base_url == "http://localhost:9000/v1"
    assert upstream.api_key == ""
    assert dict(upstream.headers) == {}
    assert upstream.timeout_s == 600.0


def test_budget_defaults_are_exact() -> None:
    policy = parse_config(minimal(), {}).defaults
    assert policy.daily_micros == 100_000_000
    assert policy.monthly_micros == 2_000_000_000
    assert policy.soft_cap == Decimal("0.8")
    assert isinstance(policy.soft_cap, Decimal)
    assert policy.hard_cap == Decimal("1.0")
    assert policy.timezone == "UTC"
    assert policy == BUILTIN_DEFAULTS


def test_budget_caps_are_decimals_not_floats() -> None:
    raw = with_changes(budgets={"defaults": {"soft_cap": 0.1, "hard_cap": 0.3, "daily_usd": 0.1}})
    policy = parse_config(raw, {}).defaults
    # float(0.1) is not 1/10; the config must keep the decimal the user wrote.
    assert policy.soft_cap == Decimal("0.1")
    assert policy.hard_cap == Decimal("0.3")
    assert policy.daily_micros == 100_000


def test_full_contract_example_values() -> None:
    raw = with_changes(
        server={"host": "0.0.0.0", "port": 9090, "max_body_bytes": 1024},
        store={"redis_url": "redis://localhost:6379/0", "key_prefix": "gpx", "on_unavailable": "fail_open"},
        upstreams={"openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-x",
                              "headers": {"Helicone-Auth": "Bearer h", "X-Num": 3}, "timeout_s": 30}},
        models={
            "gpt-4o": {"upstream": "openai", "input": 2.5, "cached_input": 1.25, "output": 10,
                       "max_output_tokens": 100, "downgrade_to": "gpt-4o-mini"},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
        },
        admin={"api_key": "admin-secret"},
    )
    config = parse_config(raw, {})
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9090
    assert config.server.max_body_bytes == 1024
    assert config.store.embedded is False
    assert config.store.fail_open is True
    assert config.store.key_prefix == "gpx"
    assert config.upstreams["openai"].api_key == "sk-x"
    assert dict(config.upstreams["openai"].headers) == {"Helicone-Auth": "Bearer h", "X-Num": "3"}
    assert config.upstreams["openai"].timeout_s == 30.0
    assert config.models["gpt-4o-mini"].price == Price(input=150_000, cached_input=75_000, output=600_000)
    assert config.models["gpt-4o"].max_output_tokens == 100
    chain = config.downgrade_chain(config.models["gpt-4o"])
    assert [m.name for m in chain] == ["gpt-4o", "gpt-4o-mini"]
    assert config.admin_api_key == "admin-secret"


def test_cached_input_defaults_to_input_price() -> None:
    raw = with_changes(models={"m": {"input": 3, "output": 4}})
    assert parse_config(raw, {}).models["m"].price == Price(input=3_000_000, cached_input=3_000_000, output=4_000_000)


def test_downgrade_chain_of_three() -> None:
    raw = with_changes(models={
        "a": {"input": 3, "output": 3, "downgrade_to": "b"},
        "b": {"input": 2, "output": 2, "downgrade_to": "c"},
        "c": {"input": 1, "output": 1},
    })
    config = parse_config(raw, {})
    assert [m.name for m in config.downgrade_chain(config.models["a"])] == ["a", "b", "c"]
    assert [m.name for m in config.downgrade_chain(config.models["c"])] == ["c"]


def test_empty_document_reports_missing_upstreams() -> None:
    assert error_of(None).path == "upstreams"


# --- errors name the exact field -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (with_changes(sever={}), "sever"),
        (with_changes(server={"prot": 1}), "server.prot"),
        (with_changes(store={"redis": ""}), "store.redis"),
        (with_changes(upstreams={"openai": {"base_url": "http://x", "apikey": ""}}), "upstreams.openai.apikey"),
        (with_changes(models={"gpt-4o": {"input": 1, "output": 1, "inptu": 2}}), "models.gpt-4o.inptu"),
        (with_changes(budgets={"default": {}}), "budgets.default"),
        (with_changes(budgets={"defaults": {"daily": 5}}), "budgets.defaults.daily"),
        (with_changes(tenants={"acme": {"daly_usd": 5}}), "tenants.acme.daly_usd"),
        (with_changes(auth={"service_key": []}), "auth.service_key"),
        (with_changes(admin={"key": "x"}), "admin.key"),
    ],
)
def test_unknown_keys_are_errors(raw: dict[str, Any], path: str) -> None:
    error = error_of(raw)
    assert error.path == path
    assert "unknown field" in error.message
    assert str(error).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (with_changes(server="localhost"), "server"),
        (with_changes(server={"port": "8080"}), "server.port"),
        (with_changes(server={"port": True}), "server.port"),
        (with_changes(server={"port": 8080.0}), "server.port"),
        (with_changes(server={"port": 70000}), "server.port"),
        (with_changes(server={"max_body_bytes": 0}), "server.max_body_bytes"),
        (with_changes(server={"host": ""}), "server.host"),
        (with_changes(server={"host": 5}), "server.host"),
        (with_changes(store={"on_unavailable": "fail_sometimes"}), "store.on_unavailable"),
        (with_changes(store={"key_prefix": "g{p}"}), "store.key_prefix"),
        (with_changes(store={"lease_s": 0.1}), "store.lease_s"),
        (with_changes(store={"lease_s": "long"}), "store.lease_s"),
        (with_changes(store={"journal_dir": 7}), "store.journal_dir"),
        (with_changes(upstreams={"openai": {"base_url": "ftp://x"}}), "upstreams.openai.base_url"),
        (with_changes(upstreams={"openai": {}}), "upstreams.openai.base_url"),
        (with_changes(upstreams={"openai": {"base_url": "http://x", "timeout_s": "soon"}}),
         "upstreams.openai.timeout_s"),
        (with_changes(upstreams={"openai": {"base_url": "http://x", "timeout_s": 0}}), "upstreams.openai.timeout_s"),
        (with_changes(upstreams={"openai": {"base_url": "http://x", "headers": {"A": ["b"]}}}),
         "upstreams.openai.headers.A"),
        (with_changes(upstreams={"openai": {"base_url": "http://x", "headers": ["A"]}}), "upstreams.openai.headers"),
        # A model that neither proxy.yaml nor the price catalog prices (test_price_catalog.py: one it knows).
        (with_changes(models={"house-model": {"output": 1}}), "models.house-model.input"),
        (with_changes(models={"house-model": {"input": 1}}), "models.house-model.input"),
        (with_changes(models={"gpt-4o": {"input": "cheap", "output": 1}}), "models.gpt-4o.input"),
        (with_changes(models={"gpt-4o": {"input": True, "output": 1}}), "models.gpt-4o.input"),
        (with_changes(models={"gpt-4o": {"input": ".nan", "output": 1}}), "models.gpt-4o.input"),
        (with_changes(models={"gpt-4o": {"input": 1, "output": 1, "max_output_tokens": 0}}),
         "models.gpt-4o.max_output_tokens"),
        (with_changes(models={"gpt-4o": {"input": 1, "output": 1, "max_output_tokens": "many"}}),
         "models.gpt-4o.max_output_tokens"),
        (with_changes(models={"gpt-4o": {"input": 1, "output": 1, "downgrade_to": 5}}),
         "models.gpt-4o.downgrade_to"),
        (with_changes(models={"gpt-4o": 2.5}), "models.gpt-4o"),
        (with_changes(budgets={"defaults": {"daily_usd": "lots"}}), "budgets.defaults.daily_usd"),
        (with_changes(budgets={"defaults": {"monthly_usd": -1}}), "budgets.defaults.monthly_usd"),
        (with_changes(budgets={"defaults": {"hard_cap": 0}}), "budgets.defaults.hard_cap"),
        (with_changes(budgets={"defaults": {"soft_cap": -0.1}}), "budgets.defaults.soft_cap"),
        (with_changes(budgets={"defaults": {"timezone": ""}}), "budgets.defaults.timezone"),
        (with_changes(tenants={"acme": {"api_keys": "sha256:" + HEX_A}}), "tenants.acme.api_keys"),
        (with_changes(tenants={"acme": {"api_keys": [""]}}), "tenants.acme.api_keys[0]"),
        (with_changes(tenants={"acme": "x"}), "tenants.acme"),
        (with_changes(auth={"tenant_header": ""}), "auth.tenant_header"),
    ],
)
def test_bad_values_name_the_field(raw: dict[str, Any], path: str) -> None:
    assert error_of(raw).path == path


@pytest.mark.parametrize("field", ["input", "cached_input", "output"])
def test_negative_prices_are_errors(field: str) -> None:
    model: dict[str, Any] = {"input": 1, "cached_input": 1, "output": 1}
    model[field] = -0.01
    error = error_of(with_changes(models={"gpt-4o": model}))
    assert error.path == f"models.gpt-4o.{field}"
    assert "at least 0" in error.message


def test_zero_prices_are_allowed() -> None:
    raw = with_changes(models={"free": {"input": 0, "output": 0}})
    assert parse_config(raw, {}).models["free"].price == Price(0, 0, 0)


def test_soft_cap_above_hard_cap() -> None:
    error = error_of(with_changes(budgets={"defaults": {"soft_cap": 0.9, "hard_cap": 0.8}}))
    assert error.path == "budgets.defaults.soft_cap"
    assert "hard_cap" in error.message


def test_tenant_soft_cap_above_inherited_hard_cap() -> None:
    raw = with_changes(budgets={"defaults": {"hard_cap": 0.9}}, tenants={"acme": {"soft_cap": 0.95}})
    assert error_of(raw).path == "tenants.acme.soft_cap"


def test_soft_cap_equal_to_hard_cap_is_allowed() -> None:
    policy = parse_config(with_changes(budgets={"defaults": {"soft_cap": 1, "hard_cap": 1}}), {}).defaults
    assert policy.soft_cap == policy.hard_cap == Decimal(1)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (with_changes(budgets={"defaults": {"timezone": "Mars/Olympus"}}), "budgets.defaults.timezone"),
        (with_changes(tenants={"acme": {"timezone": "America/Chicag"}}), "tenants.acme.timezone"),
        (with_changes(tenants={"acme": {"timezone": "../etc/passwd"}}), "tenants.acme.timezone"),
    ],
)
def test_unknown_timezone(raw: dict[str, Any], path: str) -> None:
    error = error_of(raw)
    assert error.path == path
    assert "IANA" in error.message


def test_downgrade_to_missing_model() -> None:
    raw = with_changes(models={"gpt-4o": {"input": 1, "output": 1, "downgrade_to": "gpt-4o-mini"}})
    error = error_of(raw)
    assert error.path == "models.gpt-4o.downgrade_to"
    assert "gpt-4o-mini" in error.message


def test_downgrade_to_missing_model_deep_in_chain_names_the_culprit() -> None:
    raw = with_changes(models={
        "a": {"input": 1, "output": 1, "downgrade_to": "b"},
        "b": {"input": 1, "output": 1, "downgrade_to": "zzz"},
    })
    error = error_of(raw)
    assert error.path == "models.b.downgrade_to"
    assert "zzz" in error.message


def test_downgrade_cycle() -> None:
    raw = with_changes(models={
        "a": {"input": 1, "output": 1, "downgrade_to": "b"},
        "b": {"input": 1, "output": 1, "downgrade_to": "a"},
    })
    error = error_of(raw)
    assert error.path == "models.a.downgrade_to"
    assert "cycle" in error.message
    assert "a -> b -> a" in error.message


def test_downgrade_to_itself_is_a_cycle() -> None:
    error = error_of(with_changes(models={"a": {"input": 1, "output": 1, "downgrade_to": "a"}}))
    assert error.path == "models.a.downgrade_to"
    assert "cycle" in error.message


def test_model_naming_missing_upstream() -> None:
    raw = with_changes(models={"gpt-4o": {"upstream": "azure", "input": 1, "output": 1}})
    error = error_of(raw)
    assert error.path == "models.gpt-4o.upstream"
    assert "openai" in error.message


def test_model_without_upstream_when_several_exist() -> None:
    raw = with_changes(
        upstreams={"a": {"base_url": "http://a"}, "b": {"base_url": "http://b"}},
        models={"m": {"input": 1, "output": 1}},
    )
    assert error_of(raw).path == "models.m.upstream"


@pytest.mark.parametrize("value", [None, {}])
def test_no_upstreams(value: Any) -> None:
    raw = minimal()
    if value is None:
        del raw["upstreams"]
    else:
        raw["upstreams"] = value
    error = error_of(raw)
    assert error.path == "upstreams"
    assert "at least one upstream" in error.message


@pytest.mark.parametrize("value", [None, {}])
def test_no_models(value: Any) -> None:
    raw = minimal()
    if value is None:
        del raw["models"]
    else:
        raw["models"] = value
    error = error_of(raw)
    assert error.path == "models"
    assert "at least one model" in error.message


@pytest.mark.parametrize("tenant", ["-acme", "acme corp", "a/b", "x" * 65, "", "ac{me}", "é"])
def test_invalid_tenant_ids(tenant: str) -> None:
    error = error_of(with_changes(tenants={tenant: {}}))
    assert error.path == f"tenants.{tenant}"
    assert "tenant ids must match" in error.message


@pytest.mark.parametrize("tenant", ["acme", "A", "1", "acme.corp_2-x", "x" * 64])
def test_valid_tenant_ids(tenant: str) -> None:
    assert tenant in parse_config(with_changes(tenants={tenant: {}}), {}).tenants


def test_duplicate_key_across_tenants() -> None:
    raw = with_changes(tenants={
        "acme": {"api_keys": ["sha256:" + HEX_A]},
        "globex": {"api_keys": ["sha256:" + HEX_B, "sha256:" + HEX_A]},
    })
    error = error_of(raw)
    assert error.path == "tenants.globex.api_keys"
    assert "acme" in error.message


def test_duplicate_key_across_tenants_plain_and_hashed() -> None:
    raw = with_changes(tenants={
        "acme": {"api_keys": ["secret-key"]},
        "globex": {"api_keys": [hash_key("secret-key")]},
    })
    assert error_of(raw).path == "tenants.globex.api_keys"


def test_service_key_also_a_tenant_key() -> None:
    raw = with_changes(
        tenants={"acme": {"api_keys": ["sha256:" + HEX_A]}},
        auth={"service_keys": ["sha256:" + HEX_A]},
    )
    error = error_of(raw)
    assert error.path == "auth.service_keys"
    assert "tenant key" in error.message


@pytest.mark.parametrize(
    "value",
    ["sha256:", "sha256:abc", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:" + "a" * 65,
     "sha256:" + "g" * 64, "sha256: " + "a" * 64],
)
def test_bad_sha256_forms(value: str) -> None:
    raw = with_changes(tenants={"acme": {"api_keys": ["sha256:" + HEX_B, value]}})
    error = error_of(raw)
    assert error.path == "tenants.acme.api_keys[1]"
    assert "64 lowercase hex" in error.message


def test_bad_sha256_in_service_keys() -> None:
    assert error_of(with_changes(auth={"service_keys": ["sha256:xyz"]})).path == "auth.service_keys[0]"


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis:/x", "tcp://h"])
def test_bad_redis_url_scheme(url: str) -> None:
    error = error_of(with_changes(store={"redis_url": url}))
    assert error.path == "store.redis_url"
    assert "redis://" in error.message


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:6380", "unix:///tmp/redis.sock"])
def test_good_redis_url_schemes(url: str) -> None:
    store = parse_config(with_changes(store={"redis_url": url}), {}).store
    assert store.redis_url == url
    assert store.embedded is False


# --- environment expansion -------------------------------------------------------------------


def test_env_var_expands() -> None:
    raw = with_changes(store={"redis_url": "${REDIS_URL}"})
    assert parse_config(raw, {"REDIS_URL": "redis://h:1/2"}).store.redis_url == "redis://h:1/2"


def test_env_var_inside_text() -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "http://${HOST}:${PORT}/v1"}})
    config = parse_config(raw, {"HOST": "example", "PORT": "81"})
    assert config.upstreams["openai"].base_url == "http://example:81/v1"


def test_env_default_used_when_unset() -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "${URL:-https://api.openai.com/v1}"}})
    assert parse_config(raw, {}).upstreams["openai"].base_url == "https://api.openai.com/v1"
    assert parse_config(raw, {"URL": "http://other"}).upstreams["openai"].base_url == "http://other"


def test_env_empty_default() -> None:
    raw = with_changes(store={"redis_url": "${REDIS_URL:-}"})
    assert parse_config(raw, {}).store.redis_url == ""


def test_env_set_but_empty_wins_over_default() -> None:
    raw = with_changes(admin={"api_key": "${ADMIN:-fallback}"})
    assert parse_config(raw, {"ADMIN": ""}).admin_api_key == ""


def test_double_dollar_is_literal_dollar() -> None:
    raw = with_changes(admin={"api_key": "pa$$word-$${NOT_A_VAR}"})
    assert parse_config(raw, {"NOT_A_VAR": "oops"}).admin_api_key == "pa$word-${NOT_A_VAR}"


def test_env_expansion_in_lists_and_numbers_stay_numbers() -> None:
    raw = with_changes(tenants={"acme": {"api_keys": ["${ACME_KEY}"], "daily_usd": 5}})
    config = parse_config(raw, {"ACME_KEY": "sha256:" + HEX_A})
    assert config.tenants["acme"].key_hashes == ("sha256:" + HEX_A,)
    assert config.tenants["acme"].policy.daily_micros == 5_000_000


def test_env_number_from_string_is_accepted_where_decimal() -> None:
    raw = with_changes(budgets={"defaults": {"daily_usd": "${DAILY:-12.5}"}})
    assert parse_config(raw, {}).defaults.daily_micros == 12_500_000


def test_unset_env_var_is_an_error_naming_the_field() -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "https://x", "api_key": "${OPENAI_API_KEY}"}})
    error = error_of(raw)
    assert error.path == "upstreams.openai.api_key"
    assert "OPENAI_API_KEY" in error.message


def test_unset_env_var_in_list_names_the_index() -> None:
    raw = with_changes(tenants={"acme": {"api_keys": ["sha256:" + HEX_A, "${KEY2}"]}})
    assert error_of(raw).path == "tenants.acme.api_keys[1]"


# --- keys and warnings -----------------------------------------------------------------------


def test_hash_key_form() -> None:
    assert hash_key("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_plain_keys_are_hashed_with_a_warning_without_the_key() -> None:
    secret = "tk-very-secret-acme-key"
    service = "sk-very-secret-service-key"
    raw = with_changes(
        tenants={"acme": {"api_keys": ["sha256:" + HEX_A, secret]}},
        auth={"service_keys": [service]},
    )
    config = parse_config(raw, {})
    assert config.tenants["acme"].key_hashes == ("sha256:" + HEX_A, hash_key(secret))
    assert config.auth.service_key_hashes == (hash_key(service),)
    assert len(config.warnings) == 2
    assert "tenants.acme.api_keys[1]" in config.warnings[0]
    assert "auth.service_keys[0]" in config.warnings[1]
    for warning in config.warnings:
        assert secret not in warning
        assert service not in warning
        assert "tk-very" not in warning and "sk-very" not in warning


def test_an_upstream_without_api_key_is_named_in_a_warning() -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "https://api.openai.com/v1"},
                                  "local": {"base_url": "http://127.0.0.1:8000/v1", "api_key": ""},
                                  "keyed": {"base_url": "http://127.0.0.1:8001/v1", "api_key": "k"}})
    raw["models"]["gpt-4o"]["upstream"] = "openai"
    warnings = parse_config(raw, {}).warnings
    assert len(warnings) == 2
    assert warnings[0].startswith("upstreams.openai has no api_key") and "vLLM" in warnings[0]
    assert warnings[1].startswith("upstreams.local has no api_key")


@pytest.mark.parametrize(("field", "value"), [
    ("api_key", "sk-a\r\nX-Injected: 1"), ("headers", {"X-A": "v\nX-Injected: 1"}), ("headers", {"Bad Name": "v"}),
    ("tenant_header", "X-Tenant\n"),
])
def test_upstream_header_values_with_line_breaks_are_refused(field: str, value: Any) -> None:
    raw = with_changes(upstreams={"openai": {"base_url": "https://api.openai.com/v1", field: value}})
    assert error_of(raw).path.startswith(f"upstreams.openai.{field}")


def test_hashed_keys_give_no_warning() -> None:
    raw = with_changes(tenants={"acme": {"api_keys": [hash_key("k")]}})
    assert parse_config(raw, {}).warnings == ()


# --- tenant policies -------------------------------------------------------------------------


def test_tenant_policy_inherits_defaults_field_by_field() -> None:
    raw = with_changes(
        budgets={"defaults": {"daily_usd": 50, "monthly_usd": 900, "soft_cap": 0.7, "hard_cap": 0.95,
                              "timezone": "Europe/Berlin"}},
        tenants={
            "acme": {"daily_usd": 10, "timezone": "America/Chicago"},
            "globex": {"monthly_usd": 300.5, "soft_cap": 0.5},
            "initech": {},
        },
    )
    config = parse_config(raw, {})
    acme = config.tenants["acme"].policy
    assert (acme.daily_micros, acme.monthly_micros) == (10_000_000, 900_000_000)
    assert (acme.soft_cap, acme.hard_cap) == (Decimal("0.7"), Decimal("0.95"))
    assert acme.timezone == "America/Chicago"
    assert str(acme.zone) == "America/Chicago"
    globex = config.tenants["globex"].policy
    assert (globex.daily_micros, globex.monthly_micros) == (50_000_000, 300_500_000)
    assert (globex.soft_cap, globex.hard_cap) == (Decimal("0.5"), Decimal("0.95"))
    assert globex.timezone == "Europe/Berlin"
    assert config.tenants["initech"].policy == config.defaults
    assert config.policy_for("acme") == acme
    assert config.policy_for("unlisted") == config.defaults


def test_tenant_without_overrides_gets_builtin_defaults() -> None:
    config = parse_config(with_changes(tenants={"acme": None}), {})
    assert config.tenants["acme"].policy == BUILTIN_DEFAULTS
    assert config.tenants["acme"].key_hashes == ()


def test_fractional_budget_rounds_half_up_to_micros() -> None:
    raw = with_changes(tenants={"acme": {"daily_usd": "0.0000005", "monthly_usd": "0.0000004"}})
    policy = parse_config(raw, {}).tenants["acme"].policy
    assert policy.daily_micros == 1
    assert policy.monthly_micros == 0


# --- load_config -----------------------------------------------------------------------------


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "upstreams:\n  openai:\n    base_url: ${UP:-http://localhost:1/v1}\n"
        "models:\n  gpt-4o:\n    input: 2.50\n    output: 10.00\n"
        "budgets:\n  defaults:\n    soft_cap: 0.8\n",
        encoding="utf-8",
    )
    config = load_config(path, {})
    assert config.upstreams["openai"].base_url == "http://localhost:1/v1"
    assert config.defaults.soft_cap == Decimal("0.8")
    assert load_config(str(path), {"UP": "https://up/v1"}).upstreams["openai"].base_url == "https://up/v1"


def test_load_config_uses_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("upstreams: {o: {base_url: '${GP_TEST_UP}'}}\nmodels: {m: {input: 1, output: 1}}\n")
    monkeypatch.setenv("GP_TEST_UP", "http://from-env")
    assert load_config(path).upstreams["o"].base_url == "http://from-env"


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("models: [unclosed\n  : :\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml", {})
    assert "cannot read config file" in str(info.value)


def test_load_config_validation_error_names_field(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("upstreams: {o: {base_url: 'http://x'}}\nmodels: {gpt-4o: {input: 1, output: 1, inptu: 2}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.path == "models.gpt-4o.inptu"


def test_example_proxy_yaml_parses() -> None:
    config = load_config(REPO_ROOT / "proxy.yaml", {})
    assert len(config.models) >= 1
    assert len(config.upstreams) >= 1
    for model in config.models.values():
        assert model.upstream in config.upstreams
        config.downgrade_chain(model)  # every chain resolves


def test_a_numeric_key_names_itself_and_says_to_quote_it() -> None:
    raw = minimal()
    raw["tenants"] = {1234: {"daily_usd": 5}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, {})
    assert caught.value.path == "tenants.1234"
    assert 'quoted, "1234":' in caught.value.message


def test_journal_dir_defaults_to_the_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert parse_config(minimal(), {}).store.journal_path() == tmp_path / "guardproxy" / "journal"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_config(minimal(), {}).store.journal_path() == tmp_path / "home/.local/state/guardproxy/journal"
    config = parse_config(with_changes(store={"journal_dir": "/var/lib/gp", "lease_s": 2.5}), {})
    assert config.store.journal_path() == Path("/var/lib/gp") and config.store.lease_s == 2.5


# --- jobs and the response cache --------------------------------------------------------------


def test_job_caps_and_cache_default_off_and_inherit() -> None:
    config = parse_config(minimal(), {})
    assert config.defaults.job_micros is None and config.defaults.cache is False
    assert config.store.job_retention_days == 90
    assert (config.cache.ttl_s, config.cache.max_entry_bytes) == (3600, 1024 * 1024)
    raw = with_changes(
        budgets={"defaults": {"job_usd": 2.5, "cache": True}},
        tenants={"acme": {"api_keys": [f"sha256:{HEX_A}"]},
                 "globex": {"api_keys": [f"sha256:{HEX_B}"], "job_usd": None, "cache": False}},
        store={"job_retention_days": 30}, cache={"ttl_s": 60, "max_entry_bytes": 1000},
    )
    config = parse_config(raw, {})
    acme, globex = config.policy_for("acme"), config.policy_for("globex")
    assert acme.job_micros == 2_500_000 and acme.cache is True
    assert globex.job_micros is None and globex.cache is False
    assert config.store.job_retention_days == 30
    assert (config.cache.ttl_s, config.cache.max_entry_bytes) == (60, 1000)


@pytest.mark.parametrize(("raw", "path"), [
    (with_changes(budgets={"defaults": {"job_usd": -1}}), "budgets.defaults.job_usd"),
    (with_changes(budgets={"defaults": {"cache": "yes"}}), "budgets.defaults.cache"),
    (with_changes(cache={"ttl_s": 0}), "cache.ttl_s"),
    (with_changes(cache={"ttl": 5}), "cache.ttl"),
    (with_changes(store={"job_retention_days": 0}), "store.job_retention_days"),
])
def test_bad_job_and_cache_settings_name_the_field(raw: dict[str, Any], path: str) -> None:
    assert error_of(raw).path == path
