"""Objects created through guardproxy, each scoped to the tenant that created it.

A provider account is one namespace: every file, batch, vector store, upload, fine-tuning job,
stored response and stored chat completion made with its key can be listed, read and deleted by
anyone holding that key, and guardproxy holds one key for all its tenants. So guardproxy records,
per tenant, the id of every object created through it and the upstream that holds it
(``Store.record_objects``), and:

- reading, changing or deleting an object (``/v1/<collection>/<id>[/…]``) that the caller's tenant
  did not create is 404 ``object_not_found``, before anything reaches the upstream; its own goes to
  the upstream that created it;
- a list (``GET /v1/<collection>``) keeps only the caller's objects (several upstream pages are read
  when another tenant's objects fill one);
- a request naming another object in its body (``file_id``, ``input_file_id``, ``previous_response_id``,
  ``vector_store_ids``…) may name only the caller's own;
- ids an answer brings with it (a batch's output file, a completed upload's file, a fine-tuning
  job's result files) become the caller's too.

Objects that existed before, or were made with the provider key elsewhere, belong to no tenant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response

from guardproxy.config.settings import PAID_PASSTHROUGH
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.store.protocol import Store
from guardproxy.types import JSONObject

log = logging.getLogger("guardproxy.objects")

#: OpenAI keeps stored responses and chat completions 30 days; so does the record of who made them.
STORED_ANSWER_TTL_S = 30 * 86400

#: The collections whose objects are scoped (the path below ``/v1/``), and how long their record is
#: kept (``None``: until the object is deleted through the proxy).
COLLECTIONS: dict[str, int | None] = {
    "files": None, "uploads": None, "batches": None, "vector_stores": None, "fine_tuning/jobs": None,
    "responses": STORED_ANSWER_TTL_S, "chat/completions": STORED_ANSWER_TTL_S, "assistants": None,
    "threads": None, "conversations": None, "containers": None, "evals": None,
}
#: The stored answers of the budgeted endpoints: served (scoped) even with ``unbudgeted_paths: reject``.
STORED_ANSWERS = frozenset({"responses", "chat/completions"})
#: Served (scoped) whatever ``unbudgeted_paths`` says: the stored answers, and the files and batches
#: of the budgeted Batch API (``batches.py``).
ALWAYS_SCOPED = STORED_ANSWERS | {"files", "batches"}
#: Those of them that OpenAI lists (``GET /v1/chat/completions``; responses have no list).
LISTED = frozenset({"chat/completions"})
#: Segments below a collection that name an operation, not an object.
_OPERATIONS = {"responses": frozenset({"input_tokens", "compact"})}
#: Creating these spends money upstream that no budget sees (``unbudgeted_allow_paid`` allows it).
PAID = PAID_PASSTHROUGH
#: Created through the budgeted path (``batches.py``).
BUDGETED_CREATION = frozenset({"batches"})
#: Request fields that name another object; each must be the caller's.
REFERENCES = frozenset({
    "file_id", "file_ids", "input_file_id", "training_file", "validation_file", "previous_response_id",
    "vector_store_ids", "response_id", "conversation",
})
_REFERENCE_MARKS = tuple(f'"{name}"'.encode() for name in REFERENCES)
#: Fields of an answer that name objects made for the caller.
_DERIVED = ("output_file_id", "error_file_id", "result_files", "file")
#: At most this many upstream pages are read for one list.
MAX_LIST_PAGES = 10
_DEFAULT_LIST_LIMIT = 20


@dataclass(frozen=True)
class ObjectPath:
    """``/v1/<collection>[/<object_id>[/<rest>]]``."""

    collection: str
    object_id: str | None
    rest: str


def object_path(path: str) -> ObjectPath | None:
    """Where ``path`` (below ``/v1/``, as sent) points among the scoped collections, or ``None``.

    The collection is matched case-insensitively and with trailing dots and spaces trimmed, as a
    lenient upstream would read it; any spelling but the canonical one is refused (400), so that no
    spelling reaches another tenant's objects unscoped.
    """
    segments = path.split("/")
    loose = [segment.lower().rstrip(". ") for segment in segments]
    for collection in COLLECTIONS:
        size = collection.count("/") + 1
        if loose[:size] != collection.split("/"):
            continue
        if segments[:size] != loose[:size]:
            raise GuardError(ErrorKind.INVALID_PATH, f"Invalid request path: /v1/{path} names /v1/{collection} in "
                                                     "another spelling.")
        below = segments[size:]
        if not below or below[0] in _OPERATIONS.get(collection, ()):
            return ObjectPath(collection, None, "/".join(below)) if not below else None
        return ObjectPath(collection, below[0], "/".join(below[1:]))
    return None


def not_found(object_id: str) -> GuardError:
    return GuardError(ErrorKind.OBJECT_NOT_FOUND, f"No such object: {object_id[:100]!r}.", param="id")


def referenced_ids(body: Any) -> Iterator[str]:
    """The object ids that ``body`` names in a reference field, at any depth (bounded by the parser)."""
    stack = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for name, item in value.items():
                if name in REFERENCES:
                    if isinstance(item, str):
                        yield item
                    elif isinstance(item, list):
                        yield from (i for i in item if isinstance(i, str))
                    elif isinstance(item, dict) and isinstance(item.get("id"), str):
                        yield item["id"]  # conversation: {"id": …}
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)


def derived_ids(answer: Any) -> list[str]:
    """Ids an answer brings with it that are the caller's too (output files, an upload's file…)."""
    if not isinstance(answer, dict):
        return []
    found: list[str] = []
    for name in _DERIVED:
        value = answer.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
        elif isinstance(value, dict) and isinstance(value.get("id"), str):
            found.append(value["id"])
    return found


async def check_references(store: Store, tenant: str, raw: bytes, body: Any) -> None:
    """404 unless every object ``body`` names is the tenant's (``raw`` is checked first: most
    bodies name none, and then nothing is walked)."""
    if not any(mark in raw for mark in _REFERENCE_MARKS):
        return
    named = list(dict.fromkeys(referenced_ids(body)))
    if not named:
        return
    for object_id, upstream in zip(named, await store.object_upstreams(tenant, named), strict=True):
        if upstream is None:
            log.info("tenant=%s named object %r that is not its own", tenant, object_id[:100])
            raise not_found(object_id)


def stored_answer_id(endpoint: str, body: JSONObject, answer: Any) -> str | None:
    """The id under which the upstream stores a budgeted answer: a response unless ``store: false``,
    a chat completion when ``store: true``; ``None`` when it is not stored."""
    if not stores_answer(endpoint, body) or not isinstance(answer, dict):
        return None
    ident = answer.get("id")
    return ident if isinstance(ident, str) and ident else None


def stores_answer(endpoint: str, body: JSONObject) -> bool:
    """Whether the upstream keeps the answer to ``body`` on ``endpoint`` (OpenAI's defaults)."""
    if endpoint == "responses":
        return body.get("store") is not False
    return endpoint == "chat/completions" and body.get("store") is True


async def record(store: Store, tenant: str, collection: str, object_ids: Sequence[str], upstream: str) -> None:
    """Make ``object_ids`` the tenant's; a store that cannot take it only loses the tenant's access
    to them through the proxy (logged), never the answer."""
    ids = [i for i in object_ids if i]
    if not ids:
        return
    try:
        await store.record_objects(tenant, ids, upstream, COLLECTIONS.get(collection))
    except StoreUnavailable:
        log.warning("objects: %s of tenant=%s not recorded (store unavailable); the tenant cannot reach them "
                    "through the proxy", ", ".join(i[:100] for i in ids), tenant)


def json_answer(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def list_query(query: str, after: str | None) -> str:
    """``query`` with its ``after`` cursor replaced (or removed)."""
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "after"]
    if after is not None:
        pairs.append(("after", after))
    return urlencode(pairs)


def list_limit(query: str) -> int:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "limit" and value.isdigit():
            return max(1, min(int(value), 1000))
    return _DEFAULT_LIST_LIMIT


def is_list_page(answer: Any) -> bool:
    return isinstance(answer, dict) and isinstance(answer.get("data"), list) and all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in answer["data"])


def scoped_page(first: JSONObject, kept: list[JSONObject], limit: int, more_upstream: bool) -> JSONObject:
    """A list answer holding the caller's ``kept`` objects, its cursor fields set to match them."""
    page = kept[:limit]
    return {**first, "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more_upstream or len(kept) > limit}


def json_response(payload: Any, status: int, headers: dict[str, str]) -> Response:
    return Response(orjson.dumps(payload), status, headers=headers, media_type="application/json")


def request_query(request: Request) -> str:
    query: bytes = request.scope.get("query_string", b"")
    return query.decode("latin-1")
