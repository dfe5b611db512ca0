"""The fake upstream's stored objects: files, uploads, batches, vector stores, fine-tuning jobs, and
the responses and chat completions it stored, each created, listed, retrieved, cancelled and deleted
in OpenAI's shapes (enough of them for the openai SDK). One account for everyone, as a real
provider account is: keeping tenants apart is the proxy's work.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from guardproxy.budget.tokens import TokenCounter

#: Collection (path below ``/v1/``) -> (the objects' ``object``, their id prefix).
KINDS: dict[str, tuple[str, str]] = {
    "files": ("file", "file-"),
    "uploads": ("upload", "upload_"),
    "batches": ("batch", "batch_"),
    "vector_stores": ("vector_store", "vs_"),
    "fine_tuning/jobs": ("fine_tuning.job", "ftjob-"),
    "responses": ("response", "resp_"),
    "chat/completions": ("chat.completion", "chatcmpl-"),
}
_CANCELLABLE = ("batches", "fine_tuning/jobs", "responses", "uploads")


@dataclass
class FakeObjects:
    """Every object by id, in creation order, with the collection it belongs to."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    collection_of: dict[str, str] = field(default_factory=dict)
    #: A file's bytes, by file id.
    contents: dict[str, bytes] = field(default_factory=dict)
    #: A stored response's input items, by response id.
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Background responses as they will be once finished (``finish``), by id.
    later: dict[str, dict[str, Any]] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    def finish(self, response_id: str) -> dict[str, Any]:
        """A background response ends: retrieving it now shows it completed, with its usage."""
        done = {**self.later.pop(response_id), "background": True}
        self.objects[response_id] = done
        return done

    def new_id(self, collection: str) -> str:
        return f"{KINDS[collection][1]}fake{next(self._numbers):06d}"

    def keep(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["id"]] = obj
        self.collection_of[obj["id"]] = collection
        return obj

    def create(self, collection: str, fields: dict[str, Any]) -> dict[str, Any]:
        ident = self.new_id(collection)
        base = {"id": ident, "object": KINDS[collection][0], "created_at": int(time.time())}
        extra: dict[str, Any] = {}
        if collection == "batches":
            extra = {"status": "validating", "output_file_id": None, "error_file_id": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        elif collection == "fine_tuning/jobs":
            extra = {"status": "queued", "fine_tuned_model": None, "result_files": []}
        elif collection == "uploads":
            extra = {"status": "pending", "file": None}
        elif collection == "vector_stores":
            extra = {"status": "completed", "file_counts": {"total": 0}}
        return self.keep(collection, {**base, **fields, **extra})

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        obj = self.create("files", {"bytes": len(content), "filename": filename, "purpose": purpose,
                                    "status": "processed"})
        self.contents[obj["id"]] = content
        return obj

    def run_batch(self, batch_id: str, *, lines: int | None = None, status: str = "completed") -> dict[str, Any]:
        """Run a chat-completions batch's first ``lines`` requests (all by default) and end it with
        ``status``: its output file holds one answer per request that ran, with usage as OpenAI
        reports it (answer lengths vary per ``custom_id``; every third prompt half cached)."""
        batch = self.objects[batch_id]
        requests = [orjson.loads(raw) for raw in self.contents[batch["input_file_id"]].splitlines() if raw.strip()]
        ran = requests if lines is None else requests[:lines]
        output = b"".join(orjson.dumps(_batch_answer(i, request)) + b"\n" for i, request in enumerate(ran))
        batch["status"] = status
        batch["request_counts"] = {"total": len(requests), "completed": len(ran), "failed": 0}
        if ran:
            batch["output_file_id"] = self.add_file("batch_output.jsonl", "batch_output", output)["id"]
        return batch

    def owned_by(self, collection: str, ident: str) -> dict[str, Any] | None:
        return self.objects.get(ident) if self.collection_of.get(ident) == collection else None

    def listing(self, collection: str, after: str | None, limit: int) -> dict[str, Any]:
        ids = [i for i, c in self.collection_of.items() if c == collection]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        page = [self.objects[i] for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}


def _batch_answer(index: int, request: dict[str, Any]) -> dict[str, Any]:
    body = request["body"]
    model = body["model"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    length = 3 + sum(request["custom_id"].encode()) % 17
    length = min(length, limit) if limit else length
    prompt = TokenCounter(model).chat_prompt(body.get("messages", []))
    usage = {"prompt_tokens": prompt, "completion_tokens": length, "total_tokens": prompt + length,
             "prompt_tokens_details": {"cached_tokens": prompt // 2 if index % 3 == 0 else 0}}
    answer = {"id": f"chatcmpl-batch{index}", "object": "chat.completion", "created": int(time.time()),
              "model": model, "usage": usage,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": " hello" * length},
                           "finish_reason": "length" if limit == length else "stop"}]}
    return {"id": f"batch_req_{index}", "custom_id": request["custom_id"], "error": None,
            "response": {"status_code": 200, "request_id": f"req_batch{index}", "body": answer}}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json",
                    headers={"x-request-id": f"req_fake_{time.monotonic_ns()}"})


def _missing(ident: str) -> Response:
    return _json({"error": {"message": f"No such object: {ident}", "type": "invalid_request_error",
                            "param": "id", "code": None}}, 404)


def collection_of_path(path: str) -> tuple[str, list[str]] | None:
    """``/v1/<collection>/<rest…>`` as the collection and the segments after it, for known collections."""
    below = path.removeprefix("/v1/")
    for collection in sorted(KINDS, key=len, reverse=True):
        if below == collection or below.startswith(collection + "/"):
            return collection, [s for s in below[len(collection):].split("/") if s]
    return None


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's parts by name: (filename, bytes). Enough for the openai SDK's uploads."""
    if "boundary=" not in content_type:
        return {}
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in raw.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode().split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        fields = dict(p.strip().split("=", 1) for p in disposition.split(";")[1:] if "=" in p)
        name = fields.get("name", "").strip('"')
        filename = fields["filename"].strip('"') if "filename" in fields else None
        parts[name] = (filename, body.removesuffix(b"\r\n"))
    return parts


async def serve_object(store: FakeObjects, request: Request, collection: str, rest: list[str]) -> Response:
    """One request to a stored-object path."""
    method = request.method
    if not rest:
        if method == "GET":
            after = request.query_params.get("after")
            return _json(store.listing(collection, after, int(request.query_params.get("limit", "20"))))
        if collection == "files":
            content_type = request.headers.get("content-type", "")
            parts = _multipart(content_type, await request.body())
            if "file" not in parts:
                return _json({"error": {"message": "'file' is a required property", "type": "invalid_request_error",
                                        "param": "file", "code": None}}, 400)
            filename, content = parts.get("file", (None, b""))
            return _json(store.add_file(filename or "upload", parts.get("purpose", (None, b""))[1].decode(), content))
        raw = await request.body()
        try:
            fields = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            fields = None
        if not isinstance(fields, dict):
            return _json({"error": {"message": "We could not parse the JSON body of your request.",
                                    "type": "invalid_request_error", "param": None, "code": None}}, 400)
        return _json(store.create(collection, fields))
    ident, action = rest[0], rest[1:]
    obj = store.owned_by(collection, ident)
    if obj is None:
        return _missing(ident)
    if not action:
        if method == "DELETE":
            del store.objects[ident], store.collection_of[ident]
            return _json({"id": ident, "object": f"{obj['object']}.deleted", "deleted": True})
        if method == "POST":  # an update (metadata, a vector store's name)
            raw = await request.body()
            obj.update(orjson.loads(raw) if raw else {})
        return _json(obj)
    if action == ["content"] and collection == "files":
        return Response(store.contents.get(ident, b""), media_type="application/octet-stream")
    if action == ["cancel"] and collection in _CANCELLABLE:
        # A batch goes on until the requests under way end (``run_batch`` ends it).
        obj["status"] = "cancelling" if collection == "batches" else "cancelled"
        return _json(obj)
    if action == ["complete"] and collection == "uploads":
        part_ids = orjson.loads(await request.body()).get("part_ids", [])
        joined = b"".join(store.contents.pop(p, b"") for p in part_ids)
        obj["status"] = "completed"
        obj["file"] = store.add_file(obj.get("filename", "upload"), obj.get("purpose", ""), joined)
        return _json(obj)
    if action == ["parts"] and collection == "uploads":
        part_id = f"part_fake{time.monotonic_ns()}"
        store.contents[part_id] = _multipart(request.headers.get("content-type", ""), await request.body())["data"][1]
        return _json({"id": part_id, "object": "upload.part", "upload_id": ident, "created_at": int(time.time())})
    if action == ["input_items"] and collection == "responses":
        items = store.inputs.get(ident, [])
        return _json({"object": "list", "data": items, "first_id": None, "last_id": None, "has_more": False})
    if action == ["messages"] and collection == "chat/completions":
        messages = [choice["message"] for choice in obj.get("choices", [])]
        return _json({"object": "list", "data": messages, "first_id": None, "last_id": None, "has_more": False})
    if action == ["files"] and collection == "vector_stores":
        if method == "GET":
            files = obj.get("_files", [])
            return _json({"object": "list", "data": files, "first_id": None, "last_id": None, "has_more": False})
        file_id = orjson.loads(await request.body()).get("file_id")
        if file_id not in store.contents:
            return _missing(str(file_id))
        entry = {"id": file_id, "object": "vector_store.file", "vector_store_id": ident, "status": "completed"}
        obj.setdefault("_files", []).append(entry)
        return _json(entry)
    return _missing("/".join(rest))
