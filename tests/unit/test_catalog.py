"""The upstreams: and models: sections' routing fields: kinds, Azure, breakers, deployments, fallbacks."""

from __future__ import annotations

from typing import Any

import pytest

from guardproxy.config.models import BreakerConfig
from guardproxy.config.settings import parse_config
from guardproxy.config.validation import ConfigError
from guardproxy.errors import GuardError
from guardproxy.http.upstream import Upstream


def raw_config(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "upstreams": {
            "openai": {"base_url": "https://api.openai.com/v1"},
            "azure": {"base_url": "https://acme.openai.azure.com", "kind": "azure", "api_key": "k",
                      "api_version": "2024-10-21"},
        },
        "models": {
            "gpt-4o": {"upstream": "openai", "input": 2.5, "output": 10, "fallbacks": ["azure-4o"]},
            "azure-4o": {"upstream": "azure", "input": 2.5, "output": 10, "deployment": "prod-4o"},
        },
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def error_of(raw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, {})
    return info.value


def test_defaults() -> None:
    config = parse_config(raw_config(), {})
    openai = config.upstreams["openai"]
    assert (openai.kind, openai.api_version, openai.tenant_header) == ("openai", "", "")
    assert openai.breaker == BreakerConfig(failures=5, cooldown_s=30.0)
    assert config.models["azure-4o"].deployment == "prod-4o"
    assert config.models["azure-4o"].fallbacks == ()
    assert config.route(config.models["gpt-4o"]) == [config.models["gpt-4o"], config.models["azure-4o"]]
    assert config.unbudgeted_paths == "reject"
    assert config.unbudgeted_upstream == "openai"  # the first upstream


def test_routing_fields_parse() -> None:
    config = parse_config(raw_config(
        upstreams__openai__breaker={"failures": 0, "cooldown_s": 1.5},
        upstreams__openai__tenant_header="Helicone-User-Id",
        unbudgeted_paths="passthrough", unbudgeted_upstream="azure",
    ), {})
    assert config.upstreams["openai"].breaker == BreakerConfig(failures=0, cooldown_s=1.5)
    assert config.upstreams["openai"].tenant_header == "Helicone-User-Id"
    assert (config.unbudgeted_paths, config.unbudgeted_upstream) == ("passthrough", "azure")


@pytest.mark.parametrize("base_url", ["https://acme.openai.azure.com/openai/v1/", "https://acme.openai.azure.com/openai"])
def test_azure_base_url_is_the_resource_endpoint(base_url: str) -> None:
    config = parse_config(raw_config(upstreams__azure__base_url=base_url), {})
    assert config.upstreams["azure"].base_url == "https://acme.openai.azure.com"


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"upstreams__openai__kind": "anthropic"}, "upstreams.openai.kind", "one of openai, azure"),
        ({"upstreams__openai__api_version": "2024-10-21"}, "upstreams.openai.api_version", "kind: azure"),
        ({"upstreams__openai__breaker": {"failures": -1}}, "upstreams.openai.breaker.failures", "at least 0"),
        ({"upstreams__openai__breaker": {"cooldown_s": 0}}, "upstreams.openai.breaker.cooldown_s", "at least"),
        ({"upstreams__openai__breaker": {"failure": 3}}, "upstreams.openai.breaker.failure", "unknown field"),
        ({"upstreams__openai__breaker": 5}, "upstreams.openai.breaker", "mapping"),
        ({"upstreams__openai__tenant_header": 7}, "upstreams.openai.tenant_header", "string"),
        ({"models__gpt-4o__fallbacks": ["nope"]}, "models.gpt-4o.fallbacks[0]", "no configured model"),
        ({"models__gpt-4o__fallbacks": ["gpt-4o"]}, "models.gpt-4o.fallbacks[0]", "tried once"),
        ({"models__gpt-4o__fallbacks": ["azure-4o", "azure-4o"]}, "models.gpt-4o.fallbacks[1]", "tried once"),
        ({"models__gpt-4o__fallbacks": "azure-4o"}, "models.gpt-4o.fallbacks", "list of strings"),
        ({"models__gpt-4o__deployment": 4}, "models.gpt-4o.deployment", "string"),
        ({"unbudgeted_paths": "allow"}, "unbudgeted_paths", "one of reject, passthrough"),
        ({"unbudgeted_upstream": "nope"}, "unbudgeted_upstream", "no configured upstream"),
    ],
)
def test_errors_name_the_field(changes: dict[str, Any], path: str, words: str) -> None:
    error = error_of(raw_config(**changes))
    assert error.path == path
    assert words in error.message


def upstream(**fields: Any) -> Upstream:
    raw = raw_config()
    raw["upstreams"]["u"] = {"base_url": "https://example.test", **fields}
    return Upstream(parse_config(raw, {}).upstreams["u"])


def test_endpoint_paths() -> None:
    plain = upstream()
    assert plain.endpoint_path("chat/completions", "gpt-4o") == "chat/completions"
    dated = upstream(kind="azure", api_version="2024-10-21")
    assert dated.endpoint_path("chat/completions", "prod 4o") == (
        "openai/deployments/prod%204o/chat/completions?api-version=2024-10-21"
    )
    assert dated.endpoint_path("embeddings", "emb") == "openai/deployments/emb/embeddings?api-version=2024-10-21"
    assert dated.endpoint_path("responses", "prod") == "openai/responses?api-version=2024-10-21"
    v1 = upstream(kind="azure")
    assert v1.endpoint_path("responses", "prod") == "openai/v1/responses"
    assert str(v1.passthrough_path("files", "purpose=batch")) == "https://example.test/openai/v1/files?purpose=batch"
    assert str(plain.passthrough_path("files/file-1", "")) == "https://example.test/files/file-1"
    # The client chooses the path below the base URL, never the host.
    # Nor, once parsed as it is sent, a dot segment or an authority spelled with escapes.
    for hostile in ("http://evil.test/x", "//evil.test/x", "http:", "a/../../x", "./x", "a//b", "a?b", "a#b", "a@b",
                    "files/%2e%2e/%2e%2e/x", "a/%2E%2E", "%2e%2e/x", "x%40evil.test/y", "http%3A//evil.test/x"):
        with pytest.raises(GuardError) as caught:
            plain.passthrough_path(hostile, "")
        assert caught.value.code == "invalid_path"


def test_request_headers() -> None:
    incoming = [("authorization", "Bearer tenant-key"), ("x-custom", "1"), ("helicone-user-id", "spoof"),
                ("x-tenant-id", "acme")]
    azure = upstream(kind="azure", api_key="az", tenant_header="Helicone-User-Id", headers={"Helicone-Auth": "h"})
    assert sorted(azure.request_headers(incoming, frozenset({"x-tenant-id"}), "acme")) == [
        ("api-key", "az"), ("helicone-auth", "h"), ("helicone-user-id", "acme"), ("x-custom", "1"),
    ]
    openai = upstream(api_key="sk")
    assert sorted(openai.request_headers(incoming, frozenset(), "acme")) == [
        ("authorization", "Bearer sk"), ("helicone-user-id", "spoof"), ("x-custom", "1"), ("x-tenant-id", "acme"),
    ]
    keyless = upstream(kind="azure")  # a keyless server gets no credential, never the caller's key
    sent = keyless.request_headers(incoming, frozenset(), "acme")
    assert not any(name in ("authorization", "api-key") or "tenant-key" in value for name, value in sent)
