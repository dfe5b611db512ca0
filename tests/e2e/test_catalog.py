"""A model without hand-typed prices is charged from the catalog, exactly as check-config shows."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import yaml

from guardproxy.budget.pricing import Price, Usage, cost_micros, price_to_micros
from guardproxy.config.settings import load_config
from tests.helpers import HI, TENANT_KEY, all_settled, config_dict, guardproxy

ADMIN = {"authorization": "Bearer adm-catalog"}


def test_a_catalog_priced_model_is_charged_as_check_config_shows(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": "adm-catalog"})
    raw["models"]["gpt-4.1-nano"] = {"max_output_tokens": 500}  # no price: the catalog's
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    checked = guardproxy("check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    shown = yaml.safe_load(checked.stdout)["models"]["gpt-4.1-nano"]
    assert shown["price_source"] == "genai-prices 0.2.3 (openai/gpt-4.1-nano)"
    price = Price(*(price_to_micros(Decimal(str(shown[k]))) for k in ("input", "cached_input", "output")))
    assert price == Price(100_000, 25_000, 400_000)

    url = serve_proxy(load_config(path), config_path=path)
    reply = httpx.post(
        url + "/v1/chat/completions", json={"model": "gpt-4.1-nano", "messages": HI, "max_tokens": 300},
        headers={"authorization": f"Bearer {TENANT_KEY}", "x-fake-prompt-tokens": "123457",
                 "x-fake-cached-tokens": "77777", "x-fake-completion-tokens": "251"},
    )
    assert reply.status_code == 200, reply.text
    expected = cost_micros(Usage(123457, 251, 77777), price)
    all_settled(redis_url)
    # (123457-77777)*0.10 + 77777*0.025 + 251*0.40 USD per 1M tokens, rounded up to a micro-USD.
    assert expected == -(-(45680 * 100_000 + 77777 * 25_000 + 251 * 400_000) // 1_000_000) == 6613
    (call,) = httpx.get(url + "/admin/tenants/acme/calls", headers=ADMIN).json()["data"]
    assert call["model"] == "gpt-4.1-nano" and call["cost_micros"] == expected
