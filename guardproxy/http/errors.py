"""Errors as HTTP answers: a ``GuardError`` as a response, and the one table from the layers' own
exceptions (the store's outage, a client that hung up) to the errors clients see."""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable, new_request_id


def error_response(exc: GuardError) -> Response:
    """``exc`` as the response a client gets: OpenAI's error shape, with an ``x-request-id``."""
    headers = {"x-request-id": new_request_id(), **exc.headers}
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


def as_guard_error(exc: BaseException) -> GuardError | None:
    """The client-facing form of a failure raised below the handlers, or ``None`` for a real bug.

    The one table from the layers' own exceptions to the contract's errors: the store's outage is
    503 ``budget_store_unavailable`` wherever it happens (budgeted calls, admin API, status page).
    """
    if isinstance(exc, GuardError):
        return exc
    if isinstance(exc, StoreUnavailable):
        return GuardError(ErrorKind.STORE_UNAVAILABLE, "The budget store is unavailable; try again shortly.",
                          headers={"retry-after": "1"})
    if isinstance(exc, ClientDisconnect):
        # Nobody reads this answer; it only keeps a client that hung up from showing as a 500.
        return GuardError(ErrorKind.INVALID_JSON, "The client disconnected before the request body was read.")
    return None
