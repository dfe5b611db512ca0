"""The budget page at /admin/, end to end: guardproxy (uvicorn) with a real Redis, opened in headless Chromium.

Chromium is Debian's (`apt-get install -y chromium`, done by .ci/run). It signs in the way a person
would: the key as the password of the URL's credentials, sent after the page's Basic challenge.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import redis

from guardproxy.budget.periods import periods_at
from guardproxy.config.settings import Config, hash_key, parse_config
from guardproxy.store.layout import Keys
from tests.helpers import WINDOW, chromium, config_dict, make_config, run_chromium

ADMIN_KEY = "adm-page-secret"
INITECH_KEY = "tk-initech-secret"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# The page's colours for active / downgrading / blocked (guardproxy/admin/page.py).
COLOURS = {"active": (0x2F, 0x9E, 0x44), "downgrading": (0xE8, 0x89, 0x0C), "blocked": (0xD6, 0x33, 0x6C)}


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["initech"] = {"api_keys": [hash_key(INITECH_KEY)], "daily_usd": 5, "monthly_usd": 50}
    return parse_config(raw, {})


@pytest.fixture
def proxy(config: Config, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(config)


def put_spend(config: Config, redis_url: str, tenant: str, day_micros: int, month_micros: int,
              reserved_micros: int = 0) -> None:
    """What settled calls would have left in Redis for ``tenant``'s current local day and month."""
    periods = periods_at(datetime.now(UTC), config.policy_for(tenant).zone)
    keys = Keys(config.store.key_prefix, tenant)
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(keys.spend_day(periods.day), day_micros)
        client.set(keys.spend_month(periods.month), month_micros)
        client.set(keys.reserved, reserved_micros)
    finally:
        client.close()


# --- auth ------------------------------------------------------------------------------------


def test_page_is_404_without_an_admin_key(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> None:
    url = serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}))
    for path in ("/admin/", "/admin"):
        response = httpx.get(url + path, auth=("admin", ADMIN_KEY))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_url"
        assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("path", ["/admin/", "/admin"])
def test_page_challenges_a_browser_without_credentials(proxy: str, path: str) -> None:
    response = httpx.get(proxy + path, headers={"accept": "text/html"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="guardproxy"'
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Basic " + "YWRtaW46d3Jvbmc="},  # admin:wrong
        {"authorization": "Basic not-base64!"},
        {"authorization": f"Bearer {ADMIN_KEY}x"},
        {"cookie": "guardproxy_admin=wrong"},
    ],
)
def test_page_refuses_a_wrong_key(proxy: str, headers: dict[str, str]) -> None:
    response = httpx.get(proxy + "/admin/", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="guardproxy"'


@pytest.mark.parametrize(
    "make_client",
    [
        lambda: httpx.Client(auth=("anyone", ADMIN_KEY)),
        lambda: httpx.Client(auth=("", ADMIN_KEY)),
        lambda: httpx.Client(headers={"authorization": f"Bearer {ADMIN_KEY}"}),
        lambda: httpx.Client(cookies={"guardproxy_admin": ADMIN_KEY}),
    ],
    ids=["basic", "basic-no-user", "bearer", "cookie"],
)
def test_page_opens_with_basic_bearer_or_cookie(proxy: str, make_client: Callable[[], httpx.Client]) -> None:
    with make_client() as client:
        for path in ("/admin/", "/admin"):
            response = client.get(proxy + path)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert response.headers["cache-control"] == "no-store"
            assert '<meta http-equiv="refresh" content="15">' in response.text
            assert 'data-tenant="acme"' in response.text


def test_basic_auth_also_opens_the_json_api(proxy: str) -> None:
    # A browser that signed in for the page can follow its link to the JSON.
    response = httpx.get(proxy + "/admin/tenants", auth=("anyone", ADMIN_KEY))
    assert response.status_code == 200
    assert [t["tenant"] for t in response.json()["data"]] == ["acme", "globex", "initech"]


# --- in Chromium ---------------------------------------------------------------------------------






@dataclass
class Row:
    state: str = ""
    badge: str = ""
    widths: dict[str, str] = field(default_factory=dict)
    colours: dict[str, str] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)


class PageParser(HTMLParser):
    """Tenant rows of the page: state, badge, and per period the bar's width and colour."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, Row] = {}
        self.row: Row | None = None
        self.period = ""
        self.in_badge = False
        self.refresh = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a.get("content", "")
        elif tag == "tr" and "data-tenant" in a:
            self.row = self.rows[a["data-tenant"]] = Row(state=a["data-state"])
        elif self.row is not None and tag == "td" and "data-period" in a:
            self.period = a["data-period"]
        elif self.row is not None and "badge" in classes:
            self.in_badge = True
        elif self.row is not None and "fill" in classes:
            self.row.widths[self.period] = a["style"].removeprefix("width:").rstrip(";").strip()
            self.row.colours[self.period] = a["data-colour"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.row = None
        elif tag == "span":
            self.in_badge = False

    def handle_data(self, data: str) -> None:
        if self.row is not None:
            if self.in_badge:
                self.row.badge += data
            if data.strip():
                self.row.text.append(data.strip())


def decode_png(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """Width, height and the distinct RGB(A) pixel values of an 8-bit, non-interlaced PNG (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, (depth, colour_type, interlace)
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    previous = bytearray(stride)
    pixels: set[tuple[int, ...]] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((x + p) & 0xFF for x, p in zip(line, previous, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + (left + previous[i]) // 2) & 0xFF
        elif kind == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up, up_left = previous[i], previous[i - bpp] if i >= bpp else 0
                estimate = left + up - up_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
                nearest = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[i] = (line[i] + nearest) & 0xFF
        else:
            assert kind == 0, f"unknown PNG filter {kind}"
        pixels.update(tuple(line[i : i + 3]) for i in range(0, stride, bpp))
        previous = line
    return width, height, pixels


def test_page_in_chromium(config: Config, proxy: str, redis_url: str, tmp_path: Path) -> None:
    chromium()  # fail early, with the install line, when it is missing
    # initech: one real call, so a little settled spend and an active state.
    answer = httpx.post(proxy + "/v1/chat/completions", headers={"authorization": f"Bearer {INITECH_KEY}"},
                        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200, answer.text
    # acme ($1 a day, soft cap 80%): 85% of the day spent, a call in flight; globex ($100 a day): blocked.
    put_spend(config, redis_url, "acme", 850_000, 12_000_000, reserved_micros=20_000)
    put_spend(config, redis_url, "globex", 100_000_000, 500_000_000)
    page_url = proxy.replace("http://", f"http://user:{ADMIN_KEY}@") + "/admin/"

    dom = run_chromium(page_url, tmp_path / "profile-dom", "--dump-dom").stdout
    parser = PageParser()
    parser.feed(dom)
    assert parser.refresh == "15"
    assert list(parser.rows) == ["acme", "globex", "initech"], dom[:2000]
    acme, globex, initech = parser.rows["acme"], parser.rows["globex"], parser.rows["initech"]
    assert (acme.state, acme.badge) == ("downgrading", "downgrading")
    assert (globex.state, globex.badge) == ("blocked", "blocked")
    assert (initech.state, initech.badge) == ("active", "active")
    assert acme.widths == {"day": "85.0%", "month": "60.0%"}  # $0.85 of $1, $12 of $20
    assert acme.colours == {"day": "downgrading", "month": "active"}
    assert globex.widths == {"day": "100.0%", "month": "25.0%"}  # $100 of $100, $500 of $2,000
    assert globex.colours == {"day": "blocked", "month": "active"}
    assert initech.colours == {"day": "active", "month": "active"}
    assert initech.widths["day"] == "0.0%"
    acme_text = " ".join(acme.text)
    assert "$0.85 / $1.00 (85.0%)" in acme_text and "reserved $0.02" in acme_text
    assert "$12.00 / $20.00 (60.0%)" in acme_text
    assert "soft 80%" in acme_text and "hard 100%" in acme_text and "timezone UTC" in acme_text
    globex_text = " ".join(globex.text)
    assert "$100.00 / $100.00 (100.0%)" in globex_text and "timezone America/Chicago" in globex_text
    initech_spend = next(t for t in initech.text if t.startswith("$") and "/ $5.00" in t)
    assert initech_spend.startswith("$0.0000"), initech_spend  # micro-dollars, not "$0.00"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "admin-page.png"
    screenshot.unlink(missing_ok=True)
    run_chromium(page_url, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    width, height, pixels = decode_png(screenshot.read_bytes())
    assert (width, height) == WINDOW
    assert len(pixels) > 50, f"screenshot looks blank: {len(pixels)} distinct colours"
    for state, rgb in COLOURS.items():
        assert rgb in pixels, f"no {state} colour {rgb} in the screenshot"
