"""A reload applies the bytes it hashed, and refuses a file that would lock the operator out
(no admin key, no tenants) unless asked: guardproxy over a real socket with a real redis-server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guardproxy.config.settings import load_config
from tests.helpers import ADMIN, raw_config, status


def write(path: Path, raw: dict[str, Any] | str) -> str:
    """Replace ``path`` in one step (as an editor or a deploy does); returns the sha256 of what it wrote."""
    data = (raw if isinstance(raw, str) else yaml.safe_dump(raw)).encode()
    scratch = path.with_suffix(".tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("cut", ["admin", "tenants"])
def test_a_truncated_file_that_drops_the_admin_key_or_every_tenant_is_refused_unless_forced(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path, cut: str
) -> None:
    path = tmp_path / "proxy.yaml"
    raw = raw_config(upstream_url, redis_url, 10)
    write(path, raw)
    url = serve_proxy(load_config(path), config_path=path)
    before = status(url)
    # the file cut short before the section: still valid YAML, still a valid config
    text = yaml.safe_dump({k: v for k, v in raw.items() if k != cut})
    sha = write(path, text)
    refused = httpx.post(url + "/admin/reload", headers=ADMIN)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "reload_refused" and error["param"] == ("admin.api_key" if cut == "admin" else "tenants")
    assert "force=true" in error["message"]
    assert status(url) == before
    assert httpx.post(url + "/admin/reload?force=maybe", headers=ADMIN).status_code == 400
    forced = httpx.post(url + "/admin/reload?force=true", headers=ADMIN)
    assert forced.status_code == 200 and forced.json()["config_sha256"] == sha
    tenants = httpx.get(url + "/admin/tenants", headers=ADMIN)
    if cut == "admin":
        assert tenants.status_code == 404  # what the operator asked for
    else:
        assert tenants.status_code == 200 and status(url)["config_sha256"] == sha


FIFO_WRITER = """
import sys, time
fifo, *sources = sys.argv[1:]
datas = [open(s, "rb").read() for s in sources]
for n in range(40):
    with open(fifo, "wb") as f:  # blocks until the proxy opens the file to read it
        f.write(datas[n % 2])
    time.sleep(0.1)  # the reader sees the end of this text before the next one starts
"""


def test_the_reported_sha_is_the_one_of_the_bytes_applied(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    """The config path becomes a named pipe that hands out the two versions in turn, one per open:
    a reload that reads the file twice (once to hash, once to parse) reports one and applies the other."""
    path = tmp_path / "proxy.yaml"
    write(path, raw_config(upstream_url, redis_url, 1))
    url = serve_proxy(load_config(path), config_path=path)
    sources, limit_of = [], {}
    for daily in (0.5, 7.0):
        source = tmp_path / f"v{daily}.yaml"
        source.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, daily)))
        limit_of[hashlib.sha256(source.read_bytes()).hexdigest()] = daily
        sources.append(str(source))
    fifo = tmp_path / "proxy.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, path)
    writer = subprocess.Popen([sys.executable, "-c", FIFO_WRITER, str(path), *sources])
    applied = []
    try:
        with httpx.Client(base_url=url, headers=ADMIN, timeout=10) as client:
            for _ in range(6):
                answer = client.post("/admin/reload")
                assert answer.status_code == 200, answer.text
                sha = answer.json()["config_sha256"]
                limit = client.get("/admin/tenants/acme").json()["day"]["limit_usd"]
                applied.append((limit_of.get(sha), limit))
    finally:
        writer.kill()
        writer.wait()
    assert applied == [(0.5, 0.5), (7.0, 7.0)] * 3
