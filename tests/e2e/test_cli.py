"""The ``guardproxy`` command as a user runs it: a real subprocess, its exit code and output."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import yaml

from guardproxy.demo import run_demo
from tests.helpers import config_dict, guardproxy

REPO = Path(__file__).resolve().parents[2]




def test_hash_key_prints_the_sha256_form() -> None:
    done = guardproxy("hash-key", "gp-acme-demo-key")
    assert done.returncode == 0
    assert done.stdout.strip() == "sha256:" + hashlib.sha256(b"gp-acme-demo-key").hexdigest()


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    raw = config_dict("http://127.0.0.1:9", store={"redis_url": "redis://:redis-pass-123@127.0.0.1:6379/0"},
                      admin={"api_key": "${ADMIN_KEY}"})
    raw["upstreams"]["openai"]["headers"] = {"Helicone-Auth": "Bearer helicone-secret-9"}
    raw["tenants"]["acme"]["api_keys"] = ["plain-tenant-key-77"]
    raw["alerts"] = {"webhooks": [{"url": "https://hooks.slack.com/services/T0/B0/slack-secret-31", "format": "slack",
                                   "headers": {"authorization": "Bearer hook-secret-13"}}]}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = guardproxy("check-config", "--offline", "--config", str(path), env={"ADMIN_KEY": "admin-secret-55"})
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    for secret in ("sk-upstream-secret", "redis-pass-123", "helicone-secret-9", "plain-tenant-key-77",
                   "admin-secret-55", hashlib.sha256(b"plain-tenant-key-77").hexdigest(), "slack-secret-31",
                   "hook-secret-13"):
        assert secret not in shown
    resolved = yaml.safe_load(done.stdout)
    assert resolved["store"]["url"] == "redis://:***@127.0.0.1:6379/0"
    assert resolved["store"]["lease_s"] == 30.0 and resolved["store"]["journal_dir"].endswith("/guardproxy/journal")
    assert resolved["models"]["gpt-4o"]["output"] == 10.0
    assert resolved["alerts"]["webhooks"][0]["url"] == "https://hooks.slack.com/***"
    assert "plain key" in done.stderr  # the start-up warning names the field, not the key


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"models": {"gpt-4o": {"input": "cheap", "output": 1}}}, "models.gpt-4o.input"),
        ({"budgets": {"defaults": {"timezone": "Mars/Olympus"}}}, "budgets.defaults.timezone"),
        ({"server": {"prot": 8080}}, "server.prot"),
    ],
)
def test_check_config_names_the_field_and_exits_non_zero(tmp_path: Path, patch: dict[str, object], field: str) -> None:
    raw = config_dict("http://127.0.0.1:9", **patch)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = guardproxy("check-config", "--config", str(path))
    assert done.returncode == 1
    assert f"{field}:" in done.stderr


def test_example_config_checks_out() -> None:
    done = guardproxy("check-config", "--config", str(REPO / "proxy.yaml"))
    assert done.returncode == 0, done.stderr


@pytest.mark.anyio
async def test_demo_shows_spend_rising_the_downgrade_and_the_429() -> None:
    out = io.StringIO()
    outcomes = await run_demo(out, pause_s=0.0)
    text = out.getvalue()
    assert outcomes["allowed"] > 0 and outcomes["downgraded"] > 0 and outcomes["rejected"] >= 4
    assert "(downgraded)" in text and "429 insufficient_quota" in text
    assert "x-should-retry: false" in text
    summary = text.split("tenant ")[-1]
    assert "acme-hvac" in summary and "bobs-plumbing" in summary


def test_demo_command_runs_to_completion() -> None:
    done = guardproxy("demo", "--short")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused with 429 at the hard cap" in done.stdout
