"""What every request passes before routing: one canonical path, sane headers, no stray keys.

One canonical spelling per request path, decided once, before routing.

A path that some server along the way could read differently from the proxy (``//``, ``.`` or
``..`` segments, ``%2F``, a backslash, a scheme, an ``@``, control characters, a trailing slash) is
refused with 400 ``invalid_path``: it is never normalised into something else, so the route the
proxy picks (budgeted, passthrough, admin) is the route the upstream would pick too. Both the
decoded ``path`` of the ASGI scope and the bytes the client really sent (``raw_path``) are checked.

Header values with control characters are refused, and a guardproxy key found in a header that
the proxy does not read keys from (a client's ``x-api-key``, say) is taken out of the request, so
that it cannot be forwarded upstream with the caller's other headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Collection
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardproxy.errors import ErrorKind, GuardError, new_request_id
from guardproxy.http.errors import error_response

#: Longer paths are refused: no OpenAI path comes near it, and it bounds the work per request.
MAX_PATH_BYTES = 2048
# Characters a path may carry as they are: RFC 3986 unreserved, ':' (fine-tuned model ids) and the
# sub-delimiters other than ';' (matrix parameters on some servers). '@' is left out on purpose.
_RAW_PATH = re.compile(rb"(?:[A-Za-z0-9\-._~:!$&'()*+,=/]|%[0-9A-Fa-f]{2})*")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# Characters that may not be percent-encoded: they would change the path's structure once decoded.
_NOT_ESCAPABLE = frozenset(b"/.\\%?#;@")
_SCHEME_SEGMENT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\x7f\\]")
#: Paths that legitimately end with a slash (the admin page).
_SLASH_PATHS = frozenset({"/admin/"})


def path_problem(path: str, raw_path: bytes | None) -> str | None:
    """Why ``path`` (decoded) / ``raw_path`` (as sent) is not canonical, or ``None`` when it is."""
    raw = (raw_path if raw_path is not None else path.encode("utf-8", "surrogateescape")).split(b"?", 1)[0]
    if len(raw) > MAX_PATH_BYTES or len(path) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    if not raw.startswith(b"/") or not path.startswith("/"):
        return "the path must start with '/'"
    if not _RAW_PATH.fullmatch(raw):
        return "the path holds a character that must not appear in it (such as '@', ';', '\\' or a space)"
    for escaped in _ESCAPE.findall(raw):
        byte = int(escaped, 16)
        if byte in _NOT_ESCAPABLE or not 0x20 <= byte <= 0x7E:
            return f"the path holds a percent-encoded %{escaped.decode().upper()}, which is not allowed"
    if raw_path is not None and unquote_to_bytes(raw) != path.encode("utf-8", "surrogateescape"):
        return "the path does not match the bytes that were sent"
    if _CONTROL_OR_BACKSLASH.search(path):
        return "the path holds a control character or a backslash"
    if path in _SLASH_PATHS:
        return None
    segments = path.split("/")[1:]
    for segment in segments:
        if segment in ("", ".", ".."):
            return "the path has an empty, '.' or '..' segment (such as '//' or a trailing '/')"
        if _SCHEME_SEGMENT.fullmatch(segment):
            return "the path holds a URL scheme"
    return None


_BAD_HEADER_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The name of a header whose value holds CR, LF or another control character, if any.

    An HTTP/1.1 parser (h11, httptools) refuses them already; this holds for any server or test
    client that hands the app a scope, so no such value is ever forwarded.
    """
    for name, value in headers:
        if _BAD_HEADER_BYTES.search(value) or _BAD_HEADER_BYTES.search(name):
            return name.decode("latin-1")[:64]
    return None


# Where the proxy reads keys from; request_headers never forwards them (nor the admin cookie).
_KEY_HEADERS = frozenset({b"authorization", b"api-key", b"cookie"})
_TOKEN_SEPARATORS = re.compile(rb"[\s,;=:\"']+")
_MIN_KEY_BYTES = 8
# Taken off a word's ends: a key quoted in prose or markup (``KEY.``, ``<KEY>``, ``(KEY)``).
_PUNCTUATION = b".,<>()[]{}!?*`|"
# Long enough to hold a key once decoded (``user:`` plus 8 bytes).
_BASE64_WORD = re.compile(rb"[A-Za-z0-9+/_-]{12,}={0,2}")


#: The shape of a key created at runtime (``keys.new_key``: ``gp-`` + 43 base64url characters); such
#: keys live in the store, not the config, so they are recognised by their shape.
_RUNTIME_KEY = re.compile(rb"gp-[A-Za-z0-9_-]{43}")


def carries_key(value: bytes, key_hashes: Collection[str]) -> bool:
    """Whether a word of ``value`` is one of the keys whose ``sha256:`` forms are ``key_hashes``, or
    has the shape of a runtime key.

    Words are what lies between separators, also with punctuation around them taken off (``KEY.``,
    ``<KEY>``, ``(KEY)``), and the words of ``value`` percent-decoded (``key%3DKEY``) and of any
    base64 word decoded (``Basic base64(user:KEY)``)."""
    if len(value) < _MIN_KEY_BYTES:  # most header values: no word of them can be a key
        return False
    return any(
        _RUNTIME_KEY.fullmatch(word) is not None or "sha256:" + hashlib.sha256(word).hexdigest() in key_hashes
        for word in _words(value, decode=True)
    )


def _words(value: bytes, *, decode: bool) -> set[bytes]:
    """The candidate key words of ``value`` (``carries_key``); ``decode``: also of its decoded forms."""
    words = set()
    for word in _TOKEN_SEPARATORS.split(value):
        for candidate in (word, word.strip(_PUNCTUATION)):
            if len(candidate) >= _MIN_KEY_BYTES:
                words.add(candidate)
    if decode:
        if b"%" in value:
            words |= _words(unquote_to_bytes(value), decode=False)
        for word in list(words):
            decoded = _base64(word)
            if decoded is not None:
                words |= _words(decoded, decode=False)
    return words


def _base64(word: bytes) -> bytes | None:
    """``word`` decoded as (standard or URL-safe) base64, padding optional; ``None`` when it is not."""
    if not _BASE64_WORD.fullmatch(word):
        return None
    padded = word + b"=" * (-len(word) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_" if b"-" in word or b"_" in word else None, validate=True)
    except binascii.Error:
        return None


def strip_keys_from_query(query: bytes, key_hashes: Collection[str]) -> bytes:
    """``query`` without the parameters whose name or value carries a guardproxy key
    (``?api_key=KEY``): a passthrough forwards the query string as it is."""
    if len(query) < _MIN_KEY_BYTES:
        return query
    kept = [part for part in query.split(b"&") if not carries_key(part, key_hashes)]
    return b"&".join(kept)


#: Header values ``EntryGuard`` remembers as carrying no key: how many, and up to what length.
_CLEAN_KEPT = 1024
_CLEAN_KEPT_BYTES = 256


class EntryGuard:
    """ASGI middleware: 400 ``invalid_path`` for every HTTP request whose path is not canonical,
    400 ``invalid_field`` for a header value with a line break or another control character,
    400 ``key_in_routing_header`` for a routing header that carries a key; headers other than the key
    headers, and query parameters, that carry a guardproxy key are removed."""

    def __init__(self, app: ASGIApp, key_hashes: Callable[[Scope], Collection[str]] = lambda scope: (),
                 routing_headers: Callable[[Scope], Collection[str]] = lambda scope: ()) -> None:
        self.app = app
        #: The ``sha256:`` forms of the running config's keys (a reload changes them), given the request's scope.
        self.key_hashes = key_hashes
        #: The headers that steer the proxy (tenant, job): a key there is a mistake to report, not
        #: a stray credential to drop (dropping it would silently lose the tenant or the job).
        self.routing_headers = routing_headers
        #: Header values found to carry no key of ``_clean_for`` (a user agent, a content type…), so
        #: that the same values of the next requests are not searched again (~3-5 µs each).
        self._clean: set[bytes] = set()
        self._clean_for: Collection[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = path_problem(scope["path"], scope.get("raw_path"))
            if problem is not None:
                error = GuardError(ErrorKind.INVALID_PATH, f"Invalid request path: {problem}.")
                await error_response(error)(scope, receive, send)
                return
            bad_header = header_problem(scope["headers"])
            if bad_header is not None:
                error = GuardError(ErrorKind.INVALID_FIELD, "A header value holds a control character.",
                                   param=bad_header)
                await error_response(error)(scope, receive, send)
                return
            key_hashes = self.key_hashes(scope)
            routing = self.routing_headers(scope)
            if key_hashes is not self._clean_for:  # another config's keys (a reload)
                self._clean, self._clean_for = set(), key_hashes
            for name, value in scope["headers"]:
                header = name.decode("latin-1").lower()
                if header in routing and self._carries_key(value, key_hashes):
                    error = GuardError(ErrorKind.KEY_IN_ROUTING_HEADER, f"The {header} header looks like an API key "
                                       "(a key's shape or one of this proxy's keys). It names a tenant or a job, "
                                       "never a credential: send the key as 'Authorization: Bearer <key>' and put "
                                       f"the tenant or job id in {header}.", param=header)
                    await error_response(error)(scope, receive, send)
                    return
            if scope.get("query_string"):
                scope["query_string"] = strip_keys_from_query(scope["query_string"], key_hashes)
            scope["headers"] = [
                (name, value) for name, value in scope["headers"]
                if name in _KEY_HEADERS or not self._carries_key(value, key_hashes)
            ]
            send = _with_request_id(send)
        await self.app(scope, receive, send)

    def _carries_key(self, value: bytes, key_hashes: Collection[str]) -> bool:
        """``carries_key``, remembering the short values that carry none (never a value with a key)."""
        if value in self._clean:
            return False
        if carries_key(value, key_hashes):
            return True
        if len(value) <= _CLEAN_KEPT_BYTES:
            if len(self._clean) >= _CLEAN_KEPT:
                self._clean.clear()
            self._clean.add(value)
        return False


def _with_request_id(send: Send) -> Send:
    """``send`` adding guardproxy's own ``x-request-id`` to an answer that has none (a passthrough
    upstream that sent none, ``/v1/models``, the admin API, ``/metrics``): every answer can be quoted
    back. Budgeted calls set theirs (the upstream's, else the one in the call log) and keep it."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(name.lower() == b"x-request-id" for name, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", new_request_id().encode())]}
        await send(message)

    return sending
