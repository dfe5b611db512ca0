"""The budgeted endpoints and how each one looks on the wire, as a table the pipeline reads.

An ``ApiShape`` says how to parse a request, count its prompt, bound its output, read the usage of
a complete answer and follow its stream. The pipeline (``pipeline.py``) is the same for all four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardproxy.budget.pricing import Usage
from guardproxy.budget.tokens import TokenCounter
from guardproxy.config.settings import ModelConfig
from guardproxy.http.relay import ChatStreamWatcher, StreamWatcher, completion_texts, usage_from
from guardproxy.http.requests import (
    ApiRequest,
    parse_chat_request,
    parse_completions_request,
    parse_embeddings_request,
    parse_responses_request,
)
from guardproxy.http.responses_stream import ResponsesStreamWatcher, answer_usage
from guardproxy.types import JSONObject


@dataclass(frozen=True)
class ApiShape:
    """One budgeted endpoint: ``POST /v1/<path>``."""

    path: str
    parse: Callable[[bytes], ApiRequest]
    #: Prompt tokens of a (validated) request body, estimated before the call.
    prompt_tokens: Callable[[TokenCounter, JSONObject], int]
    #: Usage (``None`` if not reported) and generated text of a complete answer.
    answer_usage: Callable[[Any], tuple[Usage | None, list[str]]]
    watcher: Callable[[ApiRequest], StreamWatcher]
    #: Streams report usage only when asked (``stream_options.include_usage``): the proxy asks, and
    #: hides the answer from clients that did not.
    asks_for_usage: bool
    #: The request fields that limit each output's length, the one set when a request sets none last
    #: (empty: outputs have no length, as embeddings).
    limit_fields: tuple[str, ...] = ()

    def worst_output_tokens(self, request: ApiRequest, model: ModelConfig) -> int:
        """Every output as long as the request's limit, or the model's when it sets none."""
        return request.choices * self.output_limit(request, model)

    def output_limit(self, request: ApiRequest, model: ModelConfig) -> int:
        """How long each output may be on ``model``: the request's limit, or the model's when it sets none."""
        return request.max_output_tokens or model.max_output_tokens

    def lowered_limit(self, body: JSONObject, tokens: int) -> dict[str, int]:
        """The fields that lower the output limit to ``tokens``: each limit field the request set,
        else the shape's usual one."""
        used = [name for name in self.limit_fields if body.get(name) is not None]
        return dict.fromkeys(used or self.limit_fields[-1:], tokens)


def _usage_and_texts(key: str) -> Callable[[Any], tuple[Usage | None, list[str]]]:
    def read(answer: Any) -> tuple[Usage | None, list[str]]:
        if not isinstance(answer, dict):
            return None, []
        return usage_from(answer.get("usage")), completion_texts(answer.get("choices"), key)

    return read


CHAT = ApiShape(
    path="chat/completions",
    parse=parse_chat_request,
    prompt_tokens=lambda counter, body: counter.chat_prompt(body["messages"], body.get("tools")),
    answer_usage=_usage_and_texts("message"),
    watcher=lambda request: ChatStreamWatcher(request.wants_usage),
    asks_for_usage=True,
    limit_fields=("max_completion_tokens", "max_tokens"),
)

COMPLETIONS = ApiShape(
    path="completions",
    parse=parse_completions_request,
    prompt_tokens=lambda counter, body: counter.prompts(body["prompt"]) + counter.prompts(body.get("suffix")),
    answer_usage=_usage_and_texts("text"),
    watcher=lambda request: ChatStreamWatcher(request.wants_usage, text_key="text"),
    asks_for_usage=True,
    limit_fields=("max_tokens",),
)

EMBEDDINGS = ApiShape(
    path="embeddings",
    parse=parse_embeddings_request,
    prompt_tokens=lambda counter, body: counter.prompts(body["input"]),
    answer_usage=_usage_and_texts("text"),
    watcher=lambda request: ChatStreamWatcher(request.wants_usage),  # never used: embeddings do not stream
    asks_for_usage=False,
)

RESPONSES = ApiShape(
    path="responses",
    parse=parse_responses_request,
    prompt_tokens=lambda counter, body: counter.responses_prompt(
        body.get("input"), body.get("instructions"), body.get("tools")
    ),
    answer_usage=answer_usage,
    watcher=lambda request: ResponsesStreamWatcher(),
    asks_for_usage=False,
    limit_fields=("max_output_tokens",),
)

BUDGETED = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
