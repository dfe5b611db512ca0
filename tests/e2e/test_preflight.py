"""Quiet misconfiguration fails loudly, at start-up and in ``guardproxy check-config``, with the fix
in the message: an unwritable journal, an unreachable Redis, tracing without the otel extra.
Each is a real ``guardproxy`` subprocess against a real redis-server (or a closed port)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import config_dict, guardproxy
from tests.servers import no_proxy_env

#: Runs the ``guardproxy`` command in an interpreter where OpenTelemetry cannot be imported, as in an
#: install without the ``otel`` extra (a ``None`` entry in ``sys.modules`` makes the import fail).
WITHOUT_OTEL = ("import sys; sys.modules['opentelemetry'] = None; from guardproxy.cli import main; "
                "raise SystemExit(main(sys.argv[1:]))")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, redis_url: str, **store: Any) -> Path:
    raw = config_dict("http://127.0.0.1:9", store={"redis_url": redis_url, **store})
    raw["server"] = {"port": closed_port()}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def unwritable_dirs(tmp_path: Path) -> list[Path]:
    """Directories no one can write a journal in, root included: below a regular file, inside /proc."""
    in_the_way = tmp_path / "not-a-directory"
    in_the_way.write_text("a file where the journal's parent should be\n")
    return [in_the_way / "journal", Path("/proc/guardproxy-journal")]


def test_check_config_reaches_the_store_and_says_so(tmp_path: Path, redis_url: str) -> None:
    done = guardproxy("check-config", "--config", str(write_config(tmp_path, redis_url)))
    assert done.returncode == 0, done.stderr
    assert "store: Redis at redis://127.0.0.1" in done.stderr and "answers" in done.stderr


def test_check_config_fails_when_redis_is_unreachable(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"redis://:pass-777@127.0.0.1:{closed_port()}/0")
    started = time.monotonic()
    done = guardproxy("check-config", "--config", str(path))
    assert done.returncode == 1 and time.monotonic() - started < 30
    assert "error: store.redis_url: Redis at redis://:***@127.0.0.1:" in done.stderr
    assert "Start Redis or fix store.redis_url" in done.stderr and "pass-777" not in done.stderr + done.stdout
    assert ": OK" not in done.stderr
    offline = guardproxy("check-config", "--offline", "--config", str(path))
    assert offline.returncode == 0 and "store: not checked (--offline)" in offline.stderr


@pytest.mark.parametrize("which", [0, 1], ids=["below-a-file", "in-proc"])
def test_an_unwritable_journal_fails_check_config_and_start_up(tmp_path: Path, redis_url: str, which: int) -> None:
    journal = unwritable_dirs(tmp_path)[which]
    path = write_config(tmp_path, redis_url, journal_dir=str(journal))
    checked = guardproxy("check-config", "--config", str(path))
    assert checked.returncode == 1
    assert f"error: store.journal_dir: cannot write the journal in {journal}" in checked.stderr
    assert f"mkdir -p {journal}" in checked.stderr
    served = guardproxy("serve", "--config", str(path))
    assert served.returncode == 1
    assert f"cannot start: store.journal_dir: cannot write the journal in {journal}" in served.stderr
    workers = guardproxy("serve", "--config", str(path), "--workers", "2")
    assert workers.returncode == 1 and "store.journal_dir" in workers.stderr


def test_a_writable_journal_dir_is_created_and_passes(tmp_path: Path, redis_url: str) -> None:
    journal = tmp_path / "state" / "journal"
    done = guardproxy("check-config", "--config", str(write_config(tmp_path, redis_url, journal_dir=str(journal))))
    assert done.returncode == 0, done.stderr
    assert journal.is_dir() and list(journal.iterdir()) == []  # the probe is gone


def test_tracing_without_the_otel_extra_fails_with_the_install_line_for_a_checkout_too(
    tmp_path: Path, redis_url: str
) -> None:
    path = write_config(tmp_path, redis_url)
    raw = yaml.safe_load(path.read_text())
    raw["telemetry"] = {"otlp_endpoint": "http://127.0.0.1:4318"}
    path.write_text(yaml.safe_dump(raw))
    for command in (["check-config"], ["serve"]):
        done = subprocess.run([sys.executable, "-c", WITHOUT_OTEL, *command, "--config", str(path)],
                              capture_output=True, text=True, timeout=60, env=no_proxy_env())
        assert done.returncode == 1, done.stderr[-2000:]
        assert "telemetry.otlp_endpoint is set but OpenTelemetry is not installed" in done.stderr
        assert "pip install 'guardproxy[otel]'" in done.stderr and "pip install -e '.[otel]'" in done.stderr
    # with the extra installed (this interpreter) the same file checks out
    assert guardproxy("check-config", "--config", str(path)).returncode == 0


@pytest.mark.anyio
async def test_the_app_itself_does_not_start_with_an_unwritable_journal(tmp_path: Path, redis_url: str) -> None:
    """What ``uvicorn --factory`` workers and embedders get: the lifespan fails, naming the fix."""
    from guardproxy.admin.preflight import PreflightError
    from guardproxy.app import create_app
    from guardproxy.config.settings import load_config

    journal = unwritable_dirs(tmp_path)[0]
    app = create_app(load_config(write_config(tmp_path, redis_url, journal_dir=str(journal))))
    with pytest.raises(PreflightError, match=r"store\.journal_dir: cannot write the journal"):
        async with app.router.lifespan_context(app):
            pass
