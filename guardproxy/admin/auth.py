"""Who may use the admin API: the admin key, from the ``Authorization`` header (Bearer or Basic) or the
admin page's cookie; every admin route asks ``check_admin`` first."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import Request

from guardproxy.admin.csrf import check_admin_write
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.auth import presented_key
from guardproxy.http.services import Services


def check_admin(request: Request, services: Services) -> None:
    """404 when the admin API is off, 401 unless the request carries the admin key; a request that
    changes state must also be one no other site can make a browser send (``guardproxy.admin.csrf``)."""
    expected = services.config.admin_api_key
    if not expected:
        raise GuardError(ErrorKind.NOT_FOUND, f"Unknown request URL: {request.method} {request.url.path}.")
    header_key = presented_key(request.headers)
    given = header_key or _basic_password(request) or request.cookies.get("guardproxy_admin", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        # The challenge makes a browser ask for the key (as the password) instead of showing the JSON error.
        raise GuardError(ErrorKind.INVALID_API_KEY, "A valid admin key is required.",
                         headers={"www-authenticate": 'Basic realm="guardproxy"'})
    check_admin_write(request.method, request.headers, ambient=header_key is None)


def _basic_password(request: Request) -> str:
    """The password of ``Authorization: Basic``, or "" without one; the user name is ignored."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]
