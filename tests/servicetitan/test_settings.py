"""The ``servicetitan`` config section: defaults, every validation error naming its field, masking."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from guardproxy.config.servicetitan import ServiceTitanConfig, parse_servicetitan
from guardproxy.config.validation import ConfigError
from tests.servicetitan.helpers import APP_KEY, SECRETS, TID1, TID2

MINIMAL: dict[str, Any] = {
    "app_key": APP_KEY,
    "connections": [{"st_tenant_id": TID1, "client_id": "cid-SECRET-client-1", "client_secret": "cs-SECRET"}],
}


def parse(raw: Any) -> ServiceTitanConfig:
    parsed = parse_servicetitan(raw, "servicetitan")
    assert parsed is not None
    return parsed


def with_changes(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(MINIMAL)
    raw.update(changes)
    return raw


@pytest.mark.parametrize("raw", [None, {}])
def test_absent_or_empty_section_turns_the_feature_off(raw: Any) -> None:
    assert parse_servicetitan(raw, "servicetitan") is None


def test_defaults_are_production() -> None:
    config = parse(MINIMAL)
    assert config.environment == "production"
    assert config.auth_url == "https://auth.servicetitan.io/connect/token"
    assert config.api_url == "https://api.servicetitan.io"
    assert (config.tenant_from, dict(config.tenant_map)) == ("st_tenant", {})
    assert (config.cache_ttl_s, config.negative_cache_ttl_s, config.timeout_s) == (86400, 60, 10.0)
    assert config.connections[0].st_tenant_id == TID1


def test_integration_environment_has_its_own_urls() -> None:
    config = parse(with_changes(environment="integration"))
    assert config.auth_url == "https://auth-integration.servicetitan.io/connect/token"
    assert config.api_url == "https://api-integration.servicetitan.io"


def test_url_overrides_win_over_the_environment() -> None:
    config = parse(with_changes(auth_url="http://127.0.0.1:9/connect/token", api_url="http://127.0.0.1:9/"))
    assert config.auth_url == "http://127.0.0.1:9/connect/token"
    assert config.api_url == "http://127.0.0.1:9"


def test_every_field_is_read() -> None:
    config = parse(with_changes(
        tenant_from="customField:Budget Code", tenant_map={10: "hvac", "ACME-HVAC": "acme"},
        cache_ttl_s=3600, negative_cache_ttl_s=0, timeout_s=2.5,
    ))
    assert config.tenant_from == "customField:Budget Code"
    assert dict(config.tenant_map) == {"10": "hvac", "ACME-HVAC": "acme"}
    assert (config.cache_ttl_s, config.negative_cache_ttl_s, config.timeout_s) == (3600, 0, 2.5)


def test_st_tenant_id_may_come_from_the_environment_as_a_string() -> None:
    raw = with_changes(connections=[{"st_tenant_id": f" {TID2} ", "client_id": "a", "client_secret": "b"}])
    assert parse(raw).connections[0].st_tenant_id == TID2


@pytest.mark.parametrize(
    "rule",
    ["st_tenant", "businessUnitId", "customerId", "locationId", "jobTypeId", "externalData:budget_tenant",
     "customField:Budget Code"],
)
def test_every_tenant_from_rule_is_accepted(rule: str) -> None:
    assert parse(with_changes(tenant_from=rule)).tenant_from == rule


def connection(**changes: Any) -> list[dict[str, Any]]:
    item: dict[str, Any] = {"st_tenant_id": TID1, "client_id": "a", "client_secret": "b"}
    item.update(changes)
    return [item]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"app_keys": "x"}, "servicetitan.app_keys: unknown field"),
        ({"app_key": ""}, "servicetitan.app_key: must not be empty"),
        ({"app_key": 12}, "servicetitan.app_key: must be a string"),
        ({"environment": "staging"}, "servicetitan.environment: must be one of production, integration"),
        ({"auth_url": "ftp://x"}, "servicetitan.auth_url: must be an http:// or https:// URL"),
        ({"api_url": "api.servicetitan.io"}, "servicetitan.api_url: must be an http:// or https:// URL"),
        ({"connections": None}, "servicetitan.connections: is required"),
        ({"connections": []}, "servicetitan.connections: must list at least one"),
        ({"connections": {"st_tenant_id": 1}}, "servicetitan.connections: must be a list"),
        ({"connections": ["x"]}, "servicetitan.connections[0]: must be a mapping"),
        ({"connections": connection(client_id="")}, "servicetitan.connections[0].client_id: must not be empty"),
        ({"connections": connection(client_secret=None)},
         "servicetitan.connections[0].client_secret: must not be empty"),
        ({"connections": connection(tenant=1)}, "servicetitan.connections[0].tenant: unknown field"),
        ({"connections": connection(st_tenant_id=None)}, "servicetitan.connections[0].st_tenant_id: is required"),
        ({"connections": connection(st_tenant_id="acme")},
         "servicetitan.connections[0].st_tenant_id: must be a whole number"),
        ({"connections": connection(st_tenant_id=True)},
         "servicetitan.connections[0].st_tenant_id: must be a whole number"),
        ({"connections": connection(st_tenant_id=0)},
         "servicetitan.connections[0].st_tenant_id: must be a positive 64-bit integer"),
        ({"connections": connection(st_tenant_id=2**63)},
         "servicetitan.connections[0].st_tenant_id: must be a positive 64-bit integer"),
        ({"connections": connection() + connection()}, f"servicetitan.connections[1].st_tenant_id: {TID1} is listed"),
        ({"tenant_from": "jobNumber"}, "servicetitan.tenant_from: must be one of st_tenant, businessUnitId"),
        ({"tenant_from": "st_tenant:x"}, "servicetitan.tenant_from: must be one of"),
        ({"tenant_from": "externalData:"}, "servicetitan.tenant_from: externalData: needs a name"),
        ({"tenant_map": ["a"]}, "servicetitan.tenant_map: must be a mapping"),
        ({"tenant_map": {10: "not a tenant"}}, "servicetitan.tenant_map.10: must be a tenant id"),
        ({"tenant_map": {"x": "-leading-dash"}}, "servicetitan.tenant_map.x: must be a tenant id"),
        ({"cache_ttl_s": -1}, "servicetitan.cache_ttl_s: must be at least 0"),
        ({"cache_ttl_s": "1d"}, "servicetitan.cache_ttl_s: must be a whole number"),
        ({"negative_cache_ttl_s": 1.5}, "servicetitan.negative_cache_ttl_s: must be a whole number"),
        ({"timeout_s": 0}, "servicetitan.timeout_s: must be at least 0.001"),
        ({"timeout_s": "soon"}, "servicetitan.timeout_s: must be a number"),
    ],
)
def test_each_error_names_its_field(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_servicetitan(with_changes(**changes), "servicetitan")
    assert str(caught.value).startswith(expected), str(caught.value)


def test_a_section_that_is_not_a_mapping_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^servicetitan: must be a mapping"):
        parse_servicetitan(["x"], "servicetitan")


def test_masked_hides_every_credential() -> None:
    raw = with_changes(connections=[
        {"st_tenant_id": TID1, "client_id": SECRETS[3], "client_secret": SECRETS[1]},
        {"st_tenant_id": TID2, "client_id": SECRETS[4], "client_secret": SECRETS[2]},
    ])
    masked = parse(raw).masked()
    text = orjson.dumps(masked).decode()
    assert "SECRET" not in text
    assert masked["app_key"] == "***"
    assert masked["connections"] == [
        {"st_tenant_id": TID1, "client_id": "***", "client_secret": "***"},
        {"st_tenant_id": TID2, "client_id": "***", "client_secret": "***"},
    ]
    assert masked["api_url"] == "https://api.servicetitan.io"


def test_repr_shows_no_credential() -> None:
    config = parse(MINIMAL)
    assert "SECRET" not in repr(config)
    assert str(TID1) in repr(config)
