"""Credential custody: no guardproxy key (tenant, service, admin) ever goes upstream.

The issue's reproduction: with an upstream whose ``api_key`` is empty (``proxy.yaml`` without
``OPENAI_API_KEY``), the caller's ``Authorization: Bearer <tenant key>`` was forwarded.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from guardproxy.cli import main
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import CHAT, OTHER_TENANT_KEY, SERVICE_KEY, TENANT_KEY, config_dict, make_config
from tests.security.wire import ADMIN_KEY

SECRETS = (TENANT_KEY, OTHER_TENANT_KEY, SERVICE_KEY, ADMIN_KEY)


def sent_upstream(state: FakeUpstreamState) -> str:
    """Everything the fake received, as one text to search for secrets."""
    return repr(state.headers) + repr(state.paths) + repr(state.requests)


@pytest.mark.parametrize("keyless", [True, False])
def test_no_guardproxy_credential_reaches_the_upstream(
    keyless: bool, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    upstream = {"base_url": f"{upstream_url}/v1"} if keyless else {"base_url": f"{upstream_url}/v1", "api_key": "sk-up"}
    config = make_config(upstream_url, store={"redis_url": redis_url}, unbudgeted_paths="passthrough",
                         admin={"api_key": ADMIN_KEY}, upstreams={"openai": upstream})
    url = serve_proxy(config)
    basic = base64.b64encode(f"x:{ADMIN_KEY}".encode()).decode()
    callers = [
        {"authorization": f"Bearer {TENANT_KEY}"},
        {"api-key": TENANT_KEY},
        {"authorization": f"bearer  {TENANT_KEY}"},
        {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": "globex"},
        # A careless client also puts its key (and the admin's) in other headers: they are not forwarded.
        {"authorization": f"Bearer {TENANT_KEY}", "x-api-key": TENANT_KEY, "cookie": f"guardproxy_admin={ADMIN_KEY}",
         "proxy-authorization": f"Basic {basic}", "x-custom-auth": f"Token {TENANT_KEY}"},
        {"api-key": TENANT_KEY, "authorization": f"Basic {basic}"},
    ]
    with httpx.Client(base_url=url, timeout=10) as client:
        for headers in callers:
            assert client.post("/v1/chat/completions", content=CHAT, headers=headers).status_code == 200
            assert client.get("/v1/files", headers=headers).status_code == 200
            assert client.post("/v1/moderations", json={"input": "hi"}, headers=headers).status_code == 200
    assert len(fake_state.headers) == 3 * len(callers)
    text = sent_upstream(fake_state)
    for secret in SECRETS:
        assert secret not in text
    for sent in fake_state.headers:
        if keyless:
            assert "authorization" not in sent and "api-key" not in sent
        else:
            assert sent["authorization"] == "Bearer sk-up"
        assert "cookie" not in sent and "proxy-authorization" not in sent and "x-tenant-id" not in sent


def test_check_config_and_serve_warn_about_a_keyless_upstream(
    tmp_path: Path, upstream_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    serve_proxy: Callable[..., str],
) -> None:
    raw = config_dict(upstream_url)
    raw["upstreams"]["local"] = {"base_url": "http://127.0.0.1:11434/v1"}
    for model in raw["models"].values():
        model["upstream"] = "openai"
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: upstreams.local has no api_key" in err
    assert "upstreams.openai" not in err

    from guardproxy.config.settings import load_config

    with caplog.at_level("WARNING", logger="guardproxy"):
        serve_proxy(load_config(path))
    assert any("upstreams.local has no api_key" in r.getMessage() for r in caplog.records)


def test_the_example_proxy_yaml_warns_when_openai_api_key_is_unset(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "proxy.yaml"
    from guardproxy.config.settings import load_config

    config = load_config(example, env={})
    assert any(w.startswith("upstreams.openai has no api_key") for w in config.warnings)
