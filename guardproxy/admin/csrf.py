"""What a browser can send cross-site is refused on the admin routes that change state (pure).

A browser adds some credentials by itself: the ``guardproxy_admin`` cookie and the HTTP Basic
credentials it signed in to the page with. A page on another site can make it send them with a
form (``enctype=text/plain`` carries a body shaped as JSON) or a simple ``fetch``. So a request
that changes state (any method but GET, HEAD, OPTIONS) must:

- carry the admin key in a header a page cannot make a browser add cross-site without a CORS
  preflight (``Authorization: Bearer`` or ``api-key``); the cookie and Basic credentials open the
  read-only page and the GET routes only;
- not come from another site: ``Sec-Fetch-Site`` other than ``same-origin``/``none``, or an
  ``Origin`` that is not the proxy's own (``Host``), is refused;
- with a body, say ``Content-Type: application/json``: a form cannot.

Each check alone stops the forged form; together they also hold for browsers that send no
``Sec-Fetch-*`` headers and for a proxy behind a TLS terminator (only host and port are compared).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from guardproxy.errors import ErrorKind, GuardError

#: Methods that change nothing: open with any of the admin credentials.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``Sec-Fetch-Site`` values of a request the proxy's own page or a person (address bar, curl) made.
_OWN_SITE = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_admin_write(method: str, headers: Mapping[str, str], *, ambient: bool) -> None:
    """Refuse a state-changing admin request a browser could have been made to send cross-site.

    ``ambient``: the admin key came from the cookie or Basic credentials (not a header a page must
    set itself). 403 ``csrf_refused`` or 415 ``unsupported_media_type``; nothing for a safe method.
    """
    if method in SAFE_METHODS:
        return
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _OWN_SITE:
        raise GuardError(ErrorKind.CSRF_REFUSED, f"Admin changes are refused from another site (Sec-Fetch-Site: "
                         f"{site[:32]}). Call the admin API from a script or the proxy's own origin.")
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, headers.get("host", "")):
        raise GuardError(ErrorKind.CSRF_REFUSED, f"Admin changes are refused from another origin ({origin[:100]}); "
                         "the Origin must be the proxy's own.")
    if ambient:
        raise GuardError(ErrorKind.CSRF_REFUSED, "Changing admin state needs the admin key as 'Authorization: Bearer "
                         "<key>'. The cookie and Basic credentials, which a browser sends by itself, open the "
                         "read-only page and GET routes only.")
    if _has_body(headers) and not is_json(headers.get("content-type", "")):
        raise GuardError(ErrorKind.UNSUPPORTED_MEDIA_TYPE, "Admin request bodies must be JSON: send "
                         "'Content-Type: application/json'.", param="content-type")


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``https://proxy.example:8443``) names the host and port of ``host`` (the
    ``Host`` header). The scheme is not compared: behind a TLS terminator the proxy sees plain HTTP."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        served = urlsplit(f"//{host}")
        host_port = served.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or not served.hostname:
        return False
    if parts.hostname != served.hostname:
        return False
    return origin_port == host_port if host_port is not None else origin_port == _DEFAULT_PORTS[parts.scheme]


def is_json(content_type: str) -> bool:
    """``application/json`` (parameters such as ``charset`` allowed), or a ``+json`` type."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _has_body(headers: Mapping[str, str]) -> bool:
    length = headers.get("content-length", "").strip()
    if "transfer-encoding" in headers:
        return True
    return bool(length) and length != "0"
