"""Budgets agents can see and plan with, over real sockets with the real openai SDK: their own
budget, quotes that agree with the admission that follows them, and clamping instead of refusing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from guardproxy.admin.status import render
from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.config.settings import Config
from guardproxy.observe.state import TenantState, read_states
from guardproxy.store.redis import BudgetStore
from guardproxy.testing.fake_upstream import DEFAULT_COMPLETION_TOKENS, FakeUpstreamState
from tests.helpers import (
    DAILY_MICROS,
    GPT4O,
    HI,
    HI_PROMPT_TOKENS,
    MINI,
    OTHER_TENANT_KEY,
    SERVICE_KEY,
    TENANT_KEY,
    Sdk,
    all_settled,
    config_dict,
    keys,
    make_config,
    metric,
    redis_int,
    reserved,
    spend,
    wait_for,
)

ADMIN_KEY = "adm-secret-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def clamping_config(upstream_url: str, redis_url: str, *, clamp: bool = True, min_tokens: int = 256) -> Config:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(daily_usd=DAILY_MICROS / 1e6, clamp_max_tokens=clamp,
                                  min_completion_tokens=min_tokens)
    return make_config_from(raw)


def make_config_from(raw: dict[str, Any]) -> Config:
    from guardproxy.config.settings import parse_config

    return parse_config(raw, {})




def get_quote(client: openai.OpenAI, request: dict[str, Any], endpoint: str = "/v1/chat/completions") -> Any:
    return client.post("guardproxy/quote", body={"endpoint": endpoint, "request": request}, cast_to=object)


# -- its own budget -------------------------------------------------------------------------------


def test_an_agent_reads_its_own_budget_and_never_another_tenants(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk
) -> None:
    url = serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY}))
    client = sdk(url)
    usage = client.chat.completions.create(model="gpt-4o", messages=HI).usage
    assert usage is not None
    all_settled(redis_url)
    cost = cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), GPT4O)
    spend(redis_url, 777, tenant="globex", tz="America/Chicago")  # globex's day and month are Chicago's

    own = client.get("guardproxy/budget", cast_to=object)
    assert isinstance(own, dict)
    assert own == httpx.get(url + "/admin/tenants/acme", headers=ADMIN).json()
    assert own["tenant"] == "acme" and own["day"]["spent_usd"] == cost / 1e6 and own["day"]["limit_usd"] == 1.0

    # A tenant key naming another tenant is refused, as on every /v1 path.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.get("guardproxy/budget", cast_to=object, options={"headers": {"X-Tenant-Id": "globex"}})
    assert refused.value.code == "tenant_mismatch"
    # The other tenant's own key and a service key naming it both see globex's figures, and only those.
    globex = sdk(url)
    globex.api_key = OTHER_TENANT_KEY
    theirs = globex.get("guardproxy/budget", cast_to=object)
    assert isinstance(theirs, dict) and theirs["tenant"] == "globex" and theirs["day"]["spent_usd"] == 777 / 1e6
    service = openai.OpenAI(base_url=url + "/v1", api_key=SERVICE_KEY, max_retries=0,
                            default_headers={"X-Tenant-Id": "globex"})
    with service:
        assert service.get("guardproxy/budget", cast_to=object) == theirs
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).get("guardproxy/budget", cast_to=object)
    no_tenant = httpx.get(url + "/v1/guardproxy/budget", headers={"authorization": f"Bearer {SERVICE_KEY}"})
    assert no_tenant.status_code == 400 and no_tenant.json()["error"]["code"] == "missing_tenant"


# -- quotes ---------------------------------------------------------------------------------------


def call_and_compare(client: openai.OpenAI, request: dict[str, Any], quote: Any) -> None:
    """Send ``request`` for real and check that admission decided what ``quote`` said."""
    try:
        raw = client.chat.completions.with_raw_response.create(**request)
    except openai.RateLimitError:
        assert quote["allowed"] is False, quote
        return
    assert quote["allowed"] is True, quote
    headers = raw.headers
    assert headers["x-guardproxy-model"] == quote["model"]
    assert headers.get("x-guardproxy-downgraded-from") == quote["downgraded_from"]
    clamped = headers.get("x-guardproxy-clamped-max-tokens")
    assert (int(clamped) if clamped is not None else None) == quote["clamped_max_tokens"]


@pytest.mark.parametrize(
    ("spent_micros", "limit", "model", "expected"),
    [
        (0, {}, "gpt-4o", ("gpt-4o", None, None, "within_budget")),
        (17_000, {"max_tokens": 100}, "gpt-4o", ("gpt-4o-mini", "gpt-4o", None, "soft_cap_downgrade")),
        (12_000, {}, "gpt-4o", ("gpt-4o-mini", "gpt-4o", None, "downgraded_to_fit")),
        # 400 micro-USD left: 13 prompt tokens and 663 completion tokens of gpt-4o-mini (36 of gpt-4o).
        (19_600, {}, "gpt-4o-mini", ("gpt-4o-mini", None, 663, "clamped")),
        (19_600, {"max_completion_tokens": 900}, "gpt-4o", ("gpt-4o-mini", "gpt-4o", 663, "clamped")),
        # 100 left: 163 tokens of gpt-4o-mini, under min_completion_tokens (256).
        (19_900, {}, "gpt-4o", (None, None, None, "daily_budget_exhausted")),
    ],
    ids=["fits", "soft-cap", "downgrade-to-fit", "clamp", "downgrade-and-clamp", "refused"],
)
def test_a_quote_agrees_with_the_admission_that_follows_it(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk,
    spent_micros: int, limit: dict[str, int], model: str, expected: tuple[str | None, str | None, int | None, str],
) -> None:
    url = serve_proxy(clamping_config(upstream_url, redis_url))
    spend(redis_url, spent_micros)
    client = sdk(url)
    request: dict[str, Any] = {"model": model, "messages": HI, **limit}
    quote = get_quote(client, request)
    sent = expected[0]
    assert (quote["model"], quote["downgraded_from"], quote["clamped_max_tokens"], quote["reason"]) == expected
    assert quote["allowed"] is (sent is not None) and quote["prompt_tokens"] == HI_PROMPT_TOKENS
    assert quote["remaining_usd"] == {"day": (DAILY_MICROS - spent_micros) / 1e6,
                                      "month": (20_000_000 - spent_micros) / 1e6}
    # Nothing was reserved and nothing charged by the quote.
    assert reserved(redis_url) == 0 and redis_int(redis_url, keys()[0]) == spent_micros
    call_and_compare(client, request, quote)
    if sent is not None:
        all_settled(redis_url)
        assert redis_int(redis_url, keys()[0]) <= DAILY_MICROS


def test_a_quote_reports_the_worst_case_reserved_and_takes_the_endpoints_own_validation(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk
) -> None:
    url = serve_proxy(clamping_config(upstream_url, redis_url))
    client = sdk(url)
    quote = get_quote(client, {"model": "gpt-4o", "messages": HI, "max_tokens": 100, "n": 3})
    assert quote["worst_case_usd"] == cost_micros(Usage(HI_PROMPT_TOKENS, 300), GPT4O) / 1e6
    assert quote["state"] == "active" and quote["allowed"] is True
    responses = get_quote(client, {"model": "gpt-4o-mini", "input": "Say hello to the dispatcher."},
                          endpoint="/v1/responses")
    assert responses["allowed"] is True and responses["model"] == "gpt-4o-mini"
    assert responses["worst_case_usd"] == cost_micros(Usage(responses["prompt_tokens"], 1000), MINI) / 1e6

    for body, param in [
        ({"endpoint": "/v1/chat/completions", "request": {"model": "gpt-4o"}}, "messages"),
        ({"endpoint": "/v1/chat/completions", "request": {"model": "gpt-4o", "messages": HI, "n": 0}}, "n"),
        ({"endpoint": "/v1/images", "request": {"model": "gpt-4o"}}, "endpoint"),
        ({"request": {"model": "gpt-4o", "messages": HI}}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "request": [1]}, "request"),
        ({"endpoint": "/v1/chat/completions", "request": {}, "extra": 1}, "extra"),
    ]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.post("guardproxy/quote", body=body, cast_to=object)
        assert bad.value.param == param, body
    # an unknown model is OpenAI's 404, as the call itself would get
    with pytest.raises(openai.NotFoundError) as missing:
        client.post("guardproxy/quote", body={"endpoint": "/v1/chat/completions",
                                              "request": {"model": "nope", "messages": HI}}, cast_to=object)
    assert missing.value.param == "model" and missing.value.code == "model_not_found"
    assert httpx.post(url + "/v1/guardproxy/quote", content=b"{", headers={"authorization": f"Bearer {TENANT_KEY}"}
                      ).json()["error"]["code"] == "invalid_json"
    assert redis_int(redis_url, keys()[0]) == 0 and reserved(redis_url) == 0


# -- clamp instead of refuse ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", None])
def test_a_tenant_near_its_cap_gets_a_clamped_answer_within_the_cap(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
    field: str | None,
) -> None:
    url = serve_proxy(clamping_config(upstream_url, redis_url))
    spend(redis_url, 19_600)  # 400 micro-USD left: 13 prompt tokens + 663 completion tokens of gpt-4o-mini
    limit = {field: 900} if field else {}
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, extra_headers={"x-fake-completion-tokens": "5000"}, extra_body=limit,
    )
    assert raw.headers["x-guardproxy-clamped-max-tokens"] == "663"
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 663
    sent = fake_state.requests[-1]
    assert sent[field or "max_tokens"] == 663 and set(sent) & {"max_tokens", "max_completion_tokens"} == {
        field or "max_tokens"}
    day, month = keys()
    charged = cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), MINI)
    all_settled(redis_url)
    assert redis_int(redis_url, day) == 19_600 + charged <= DAILY_MICROS
    assert redis_int(redis_url, month) == 19_600 + charged
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_clamped_total", tenant="acme", model="gpt-4o-mini") == 1


def test_clamping_streams_and_n_above_one_multiplies_the_worst_case(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
) -> None:
    url = serve_proxy(clamping_config(upstream_url, redis_url, min_tokens=100))
    spend(redis_url, 19_600)
    with sdk(url).chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=HI, n=2, stream=True, extra_headers={"x-fake-completion-tokens": "5000"},
    ) as response:
        assert response.headers["x-guardproxy-clamped-max-tokens"] == "331"  # (400e6 - 1.95e6) / (2 * 0.6e6)
        for _ in response.iter_lines():
            pass
    assert fake_state.requests[-1]["max_tokens"] == 331
    all_settled(redis_url)
    assert 19_600 < redis_int(redis_url, keys()[0]) <= DAILY_MICROS


def test_responses_and_legacy_completions_are_clamped_in_their_own_fields(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
) -> None:
    url = serve_proxy(clamping_config(upstream_url, redis_url, min_tokens=100))
    spend(redis_url, 19_600)
    client = sdk(url)
    response = client.responses.with_raw_response.create(model="gpt-4o-mini", input="Say hello.")
    clamped = int(response.headers["x-guardproxy-clamped-max-tokens"])
    assert fake_state.requests[-1]["max_output_tokens"] == clamped and 100 <= clamped < 1000
    all_settled(redis_url)
    spent = redis_int(redis_url, keys()[0])
    legacy = client.completions.with_raw_response.create(model="gpt-4o-mini", prompt="Say hello.")
    assert fake_state.requests[-1]["max_tokens"] == int(legacy.headers["x-guardproxy-clamped-max-tokens"])
    all_settled(redis_url)
    assert spent < redis_int(redis_url, keys()[0]) <= DAILY_MICROS


def test_without_clamping_or_below_the_minimum_the_call_is_refused(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
) -> None:
    off = serve_proxy(clamping_config(upstream_url, redis_url, clamp=False))
    spend(redis_url, 19_600)
    quote = get_quote(sdk(off), {"model": "gpt-4o-mini", "messages": HI})
    assert (quote["allowed"], quote["reason"], quote["clamped_max_tokens"]) == (False, "daily_budget_exhausted", None)
    with pytest.raises(openai.RateLimitError):
        sdk(off).chat.completions.create(model="gpt-4o-mini", messages=HI)
    strict = serve_proxy(clamping_config(upstream_url, redis_url, min_tokens=700))
    with pytest.raises(openai.RateLimitError):
        sdk(strict).chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert fake_state.requests == [] and redis_int(redis_url, keys()[0]) == 19_600 and reserved(redis_url) == 0


# -- forecasts ------------------------------------------------------------------------------------


def test_a_steady_tenants_forecast_is_within_ten_percent_everywhere_it_shows(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    url = serve_proxy(config)
    client = sdk(url)
    interval_s, stop, done_at = 0.2, threading.Event(), []

    def steady_tenant() -> None:
        """One call every 200 ms on a fixed schedule, still going while the forecasts are read."""
        start = time.monotonic()
        for i in range(150):  # at most 30 s
            if stop.wait(max(0.0, start + i * interval_s - time.monotonic())):
                return
            client.chat.completions.create(model="gpt-4o-mini", messages=HI)
            done_at.append(time.monotonic())

    caller = threading.Thread(target=steady_tenant)
    caller.start()
    try:
        # Six seconds of history: a pause of the caller on a busy machine stays well under 10% of it.
        wait_for(lambda: len(done_at) >= 31, timeout_s=25)
        cost = cost_micros(Usage(HI_PROMPT_TOKENS, DEFAULT_COMPLETION_TOKENS), MINI)  # every call's
        assert redis_int(redis_url, keys()[0]) % cost == 0
        # The tenant's real pace (the schedule's, unless the machine held the caller back).
        rate_per_s = cost * (len(done_at) - 1) / (done_at[-1] - done_at[0])
        assert rate_per_s == pytest.approx(cost / interval_s, rel=0.15)

        def truth(spent_usd: float, resets_at: str | datetime) -> float:
            """A steady tenant's spend when the period resets, from what it has spent now."""
            if isinstance(resets_at, str):
                resets_at = datetime.fromisoformat(resets_at.replace("Z", "+00:00"))
            return spent_usd * 1e6 + rate_per_s * (resets_at - datetime.now(UTC)).total_seconds()

        own = client.get("guardproxy/budget", cast_to=object)
        assert isinstance(own, dict)
        assert own["burn_rate_usd_per_hour"] == pytest.approx(rate_per_s * 3600 / 1e6, rel=0.10)
        for period in ("day", "month"):
            expected = truth(own[period]["spent_usd"], own[period]["resets_at"])
            assert own[period]["projected_usd"] * 1e6 == pytest.approx(expected, rel=0.10), period
        # At this rate acme's 1 USD a day runs out within hours (unless the day ends first).
        left_s = (1_000_000 - own["day"]["spent_usd"] * 1e6) / rate_per_s
        day_end = datetime.fromisoformat(own["day"]["resets_at"].replace("Z", "+00:00"))
        if datetime.now(UTC).timestamp() + left_s * 1.1 < day_end.timestamp():
            cap_at = datetime.fromisoformat(own["day"]["hard_cap_at"].replace("Z", "+00:00"))
            assert (cap_at - datetime.now(UTC)).total_seconds() == pytest.approx(left_s, rel=0.10)

        scrape = httpx.get(url + "/metrics").text
        projected = metric(scrape, "guardproxy_budget_projected_usd", tenant="acme", period="month")
        spent = metric(scrape, "guardproxy_budget_spent_usd", tenant="acme", period="month")
        assert projected * 1e6 == pytest.approx(truth(spent, own["month"]["resets_at"]), rel=0.10)
        page = httpx.get(url + "/admin/", headers=ADMIN).text
        assert page.count('class="forecast muted"') == 4 and "projected $" in page  # two tenants, two periods
        (state,) = asyncio.run(_read(config))
        assert "projected $" in render([state]) and state.forecast is not None
        expected = truth(state.day.spent / 1e6, state.day.resets_at)
        assert state.forecast.day.projected_micros == pytest.approx(expected, rel=0.10)
    finally:
        stop.set()
        caller.join(timeout=10)


async def _read(config: Config) -> list[TenantState]:
    store = BudgetStore.from_config(config.store)
    try:
        return await read_states(store, config, ["acme"], datetime.now(UTC))
    finally:
        await store.aclose()
