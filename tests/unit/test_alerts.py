"""Alert configuration, the event a receiver gets, its Slack line and the retry schedule (pure)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from guardproxy.config.settings import AlertsConfig, WebhookConfig, parse_config
from guardproxy.config.validation import ConfigError
from guardproxy.observe.alerts import GIVE_UP_AFTER_S, MAX_RETRY_S, event_json, retry_delay_s, slack_text, webhook_body
from tests.helpers import minimal

FIELDS = {"event": "threshold", "tenant": "acme", "period": "day", "period_id": "2026-11-22",
          "threshold": "750000", "spent": "7600", "limit": "10000", "at_ms": "1795348800000"}


def alerts(section: Any) -> AlertsConfig:
    return parse_config({**minimal(), "alerts": section}, {}).alerts


def test_alerts_are_off_without_webhooks() -> None:
    config = alerts(None)
    assert not config.enabled and config.thresholds_ppm() == ()
    assert config.thresholds == (Decimal("0.5"), Decimal("0.75"), Decimal("0.9"), Decimal("1.0"))


def test_alerts_config_parses_the_issue_example() -> None:
    config = alerts({
        "webhooks": [{"url": "https://hooks.slack.com/services/T/B/x", "format": "slack", "headers": {},
                      "events": ["threshold", "downgrading", "blocked"]},
                     {"url": "http://127.0.0.1:9/hook", "headers": {"authorization": "Bearer t0k"}}],
        "thresholds": [0.9, 0.5, 0.75, 1.0],
    })
    assert config.enabled and config.thresholds_ppm() == (500_000, 750_000, 900_000, 1_000_000)
    assert config.webhooks[0] == WebhookConfig("https://hooks.slack.com/services/T/B/x", "slack", {},
                                               ("threshold", "downgrading", "blocked"))
    # a webhook that names no events gets every kind, the store's and the fleet brakes' included
    assert config.webhooks[1].format == "json" and config.webhooks[1].events == (
        "threshold", "downgrading", "blocked", "store", "loop", "velocity")


@pytest.mark.parametrize(("section", "path"), [
    ({"webhooks": [{"url": "ftp://x"}]}, "alerts.webhooks[0].url"),
    ({"webhooks": [{"url": "https://x", "format": "xml"}]}, "alerts.webhooks[0].format"),
    ({"webhooks": [{"url": "https://x", "events": ["spent"]}]}, "alerts.webhooks[0].events"),
    ({"webhooks": [{"url": "https://x", "retries": 3}]}, "alerts.webhooks[0].retries"),
    ({"webhooks": {"url": "https://x"}}, "alerts.webhooks"),
    ({"thresholds": []}, "alerts.thresholds"),
    ({"thresholds": [0]}, "alerts.thresholds[0]"),
    ({"thresholds": ["half"]}, "alerts.thresholds[0]"),
    ({"emails": []}, "alerts.emails"),
])
def test_bad_alerts_config_names_the_field(section: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        alerts(section)
    assert err.value.path == path


def test_rate_limits_in_defaults_and_per_tenant() -> None:
    raw = {**minimal(), "budgets": {"defaults": {"rpm": 60, "tpm": 100_000}},
           "tenants": {"acme": {"rpm": 5}, "globex": {}}}
    config = parse_config(raw, {})
    assert (config.defaults.rpm, config.defaults.tpm) == (60, 100_000)
    assert (config.policy_for("acme").rpm, config.policy_for("acme").tpm) == (5, 100_000)
    assert config.policy_for("globex").rpm == 60
    with pytest.raises(ConfigError) as err:
        parse_config({**minimal(), "tenants": {"acme": {"rpm": -1}}}, {})
    assert err.value.path == "tenants.acme.rpm"


def test_event_json_has_every_field_and_the_tenants_reset() -> None:
    event = event_json(FIELDS, ZoneInfo("America/Chicago"))
    assert event == {
        "event": "threshold", "tenant": "acme", "period": "day", "period_id": "2026-11-22", "threshold": 0.75,
        "spent_usd": 0.0076, "limit_usd": 0.01, "utilization": 0.76, "at": "2026-11-22T12:00:00Z",
        "resets_at": "2026-11-23T06:00:00Z",
    }
    month = event_json({**FIELDS, "period": "month", "period_id": "2026-12", "event": "blocked", "threshold": ""},
                       ZoneInfo("UTC"))
    assert month["threshold"] is None and month["resets_at"] == "2027-01-01T00:00:00Z"


def test_slack_line_says_the_facts_with_sub_cent_digits() -> None:
    text = slack_text(event_json(FIELDS, ZoneInfo("UTC")))
    assert text == ("guardproxy: tenant acme's daily budget (2026-11-22) reached 75%: $0.0076 of $0.01 spent; "
                    "resets 2026-11-23T00:00:00Z.")
    hook = WebhookConfig("https://hooks.slack.com/x", "slack")
    assert orjson.loads(webhook_body(hook, event_json(FIELDS, ZoneInfo("UTC")))) == {"text": text}
    blocked = slack_text(event_json({**FIELDS, "event": "blocked", "threshold": ""}, ZoneInfo("UTC")))
    assert "refused" in blocked and "\n" not in blocked


def test_retries_back_off_exponentially_and_outlast_a_day() -> None:
    delays = [retry_delay_s(n) for n in range(1, 14)]
    assert delays[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert delays == sorted(delays) and max(delays) == MAX_RETRY_S
    assert GIVE_UP_AFTER_S > 24 * 3600
