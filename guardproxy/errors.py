"""Every error guardproxy answers with, in OpenAI's shape.

One table maps each kind of error to its HTTP status, OpenAI error ``type``, ``code`` and the level
it is logged at, so that the status a client sees and the line an operator reads never disagree. Pure:
``guardproxy.http.errors`` turns these into responses.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str
    log_level: int


class ErrorKind(Enum):
    INVALID_JSON = ErrorSpec(400, "invalid_request_error", "invalid_json", logging.INFO)
    INVALID_PATH = ErrorSpec(400, "invalid_request_error", "invalid_path", logging.INFO)
    MISSING_FIELD = ErrorSpec(400, "invalid_request_error", "missing_field", logging.INFO)
    INVALID_FIELD = ErrorSpec(400, "invalid_request_error", "invalid_field", logging.INFO)
    MISSING_TENANT = ErrorSpec(400, "invalid_request_error", "missing_tenant", logging.INFO)
    INVALID_TENANT = ErrorSpec(400, "invalid_request_error", "invalid_tenant", logging.INFO)
    INVALID_JOB_ID = ErrorSpec(400, "invalid_request_error", "invalid_job_id", logging.INFO)
    JOB_NOT_FOUND = ErrorSpec(400, "invalid_request_error", "servicetitan_job_not_found", logging.INFO)
    KEY_IN_ROUTING_HEADER = ErrorSpec(400, "invalid_request_error", "key_in_routing_header", logging.INFO)
    INVALID_API_KEY = ErrorSpec(401, "invalid_request_error", "invalid_api_key", logging.INFO)
    TENANT_MISMATCH = ErrorSpec(403, "permission_error", "tenant_mismatch", logging.WARNING)
    # A state-changing admin request a browser could have been made to send by another site.
    CSRF_REFUSED = ErrorSpec(403, "permission_error", "csrf_refused", logging.WARNING)
    #: Creating a batch or fine-tuning job through passthrough, which no budget would see.
    PAID_PATH_REFUSED = ErrorSpec(403, "permission_error", "unbudgeted_spend_refused", logging.INFO)
    NOT_FOUND = ErrorSpec(404, "invalid_request_error", "unknown_url", logging.INFO)
    #: OpenAI's answer for a model that does not exist: SDKs and agent frameworks handle this one.
    MODEL_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "model_not_found", logging.INFO)
    #: A stored object (file, batch, response…) the caller's tenant did not create through this proxy.
    OBJECT_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "object_not_found", logging.INFO)
    METHOD_NOT_ALLOWED = ErrorSpec(405, "invalid_request_error", "method_not_supported", logging.INFO)
    REQUEST_TIMEOUT = ErrorSpec(408, "invalid_request_error", "request_timeout", logging.INFO)
    IDEMPOTENCY_CONFLICT = ErrorSpec(409, "invalid_request_error", "idempotency_key_reused", logging.INFO)
    REQUEST_TOO_LARGE = ErrorSpec(413, "invalid_request_error", "request_too_large", logging.INFO)
    UNSUPPORTED_MEDIA_TYPE = ErrorSpec(415, "invalid_request_error", "unsupported_media_type", logging.INFO)
    OVER_BUDGET = ErrorSpec(429, "insufficient_quota", "insufficient_quota", logging.INFO)
    JOB_OVER_BUDGET = ErrorSpec(429, "insufficient_quota", "job_budget_exceeded", logging.INFO)
    #: A budget level beside the tenant's day and month (global, the tenant's hour or week, the key, the model).
    LEVEL_OVER_BUDGET = ErrorSpec(429, "insufficient_quota", "insufficient_quota", logging.INFO)
    #: The caller's key may not ask for this model (the key's ``models``).
    MODEL_NOT_ALLOWED = ErrorSpec(403, "invalid_request_error", "model_not_allowed", logging.INFO)
    # OpenAI's own per-minute 429s carry the limit's kind as their type.
    RATE_LIMITED_REQUESTS = ErrorSpec(429, "requests", "rate_limit_exceeded", logging.INFO)
    RATE_LIMITED_TOKENS = ErrorSpec(429, "tokens", "rate_limit_exceeded", logging.INFO)
    # The runaway-agent brake: the same request too often from one key and job (``http/brakes.py``).
    LOOP_DETECTED = ErrorSpec(429, "requests", "loop_detected", logging.WARNING)
    INTERNAL = ErrorSpec(500, "server_error", "internal_error", logging.ERROR)
    UPSTREAM_UNAVAILABLE = ErrorSpec(502, "server_error", "upstream_unavailable", logging.WARNING)
    STORE_UNAVAILABLE = ErrorSpec(503, "server_error", "budget_store_unavailable", logging.ERROR)
    SERVICETITAN_UNAVAILABLE = ErrorSpec(503, "server_error", "servicetitan_unavailable", logging.WARNING)
    UPSTREAM_TIMEOUT = ErrorSpec(504, "server_error", "upstream_timeout", logging.WARNING)


class GuardError(Exception):
    """An error that reaches the client as an OpenAI-style JSON body.

    ``headers`` are added to the response (``retry-after``, ``x-should-retry``); ``param`` names the
    offending request field, as OpenAI does.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code or kind.value.code
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.kind.value.status

    def body(self) -> bytes:
        return error_body(self.message, self.kind.value.type, self.code, self.param)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    payload: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return orjson.dumps(payload)


class StoreUnavailable(Exception):
    """The budget store (Redis) could not be reached or did not answer in time."""


def new_request_id() -> str:
    return f"req_gp_{uuid.uuid4().hex}"
