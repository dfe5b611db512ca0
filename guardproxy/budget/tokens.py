"""Counting tokens offline with tiktoken, from the vocabularies shipped inside the package.

tiktoken downloads its BPE files on first use; guardproxy must work air-gapped, so the two
encodings it needs are package data (``vocab/*.tiktoken.gz``) and are checked against the same
sha256 that tiktoken itself expects.

An encoding costs memory for as long as the process lives (o200k_base ~45 MB, cl100k_base ~30 MB,
bench/README.md), so the proxy builds at start-up only those of its configured models
(``warm_up(models)``); any other is built on first use.
"""

from __future__ import annotations

import base64
import ctypes
import gzip
import hashlib
import threading
from collections.abc import Iterable
from importlib import resources
from typing import Any

import tiktoken
from tiktoken_ext import openai_public

_EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "text-embedding-3", "text-embedding-ada-002", "ada-002")

# OpenAI cookbook: each message costs 3 tokens of framing, a `name` one more, the reply primer 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMER = 3
# An image part is billed by size and detail, which the proxy cannot see cheaply: a fixed estimate.
TOKENS_PER_IMAGE = 765

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


def encoding_name_for(model: str) -> str:
    """The tiktoken encoding of a model name; unknown models count with ``o200k_base``."""
    if model == "gpt-4" or model.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def _load_ranks(name: str) -> dict[bytes, int]:
    packed = resources.files("guardproxy.budget").joinpath("vocab", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    digest = hashlib.sha256(data).hexdigest()
    if digest != _EXPECTED_SHA256[name]:
        raise RuntimeError(f"vocabulary {name} is corrupt (sha256 {digest}); reinstall guardproxy")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built once per process from the shipped vocabulary (never the network)."""
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding  # built already: no lock on the request path
    with _lock:
        encoding = _encodings.get(name)
        if encoding is None:
            # tiktoken's own constructor supplies the split pattern and special tokens; only the
            # source of the ranks is swapped for the packaged file.
            constructor = getattr(openai_public, name)
            original = openai_public.load_tiktoken_bpe
            openai_public.load_tiktoken_bpe = lambda *_args, **_kw: _load_ranks(name)
            try:
                spec: dict[str, Any] = constructor()
            finally:
                openai_public.load_tiktoken_bpe = original
            encoding = tiktoken.Encoding(**spec)
            # The Python copy of the ranks (~28 MB for o200k_base) is only read to pickle an Encoding;
            # the Rust core that encodes keeps its own. Counting never pickles: let it go.
            encoding._mergeable_ranks = {}
            _encodings[name] = encoding
        return encoding


def warm_up(models: Iterable[str] | None = None) -> None:
    """Build now (about half a second each) the encodings of ``models`` (default: every shipped one)
    instead of on the first request, then hand the memory freed while building back to the system."""
    names = _EXPECTED_SHA256.keys() if models is None else {encoding_name_for(model) for model in models}
    for name in sorted(names):
        get_encoding(name)
    _trim_heap()


def _trim_heap() -> None:
    """glibc keeps freed heap pages (the vocabularies' parsing leaves ~5 MB): return them. No-op elsewhere."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


class TokenCounter:
    """Counts the tokens of text and chat prompts for one model."""

    def __init__(self, model: str) -> None:
        self.encoding = get_encoding(encoding_name_for(model))

    def text(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text)) if text else 0

    def texts(self, texts: Iterable[str]) -> int:
        # Not encode_ordinary_batch: it builds and joins a thread pool per call (~1 ms), 100x the encoding.
        return sum(len(self.encoding.encode_ordinary(text)) for text in texts if text)

    def chat_prompt(self, messages: list[Any], tools: Any = None) -> int:
        """Prompt tokens of a chat request by the cookbook formula; parts other than text are estimated."""
        total = TOKENS_REPLY_PRIMER
        texts: list[str] = []
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if not isinstance(message, dict):
                continue
            for key, value in message.items():
                if key == "name":
                    total += TOKENS_PER_NAME
                total += _collect(value, texts)
        if tools:
            total += _collect(tools, texts)
        return total + self.texts(texts)

    def responses_prompt(self, input_items: Any, instructions: Any = None, tools: Any = None) -> int:
        """Input tokens of a Responses API request: ``input`` as a string or a list of items.

        Items are counted like chat messages (framing + the strings they carry); ``instructions``
        is one more message. Input kept by the upstream (``previous_response_id``) is not seen.
        """
        items = [input_items] if isinstance(input_items, str) else list(input_items or [])
        if isinstance(instructions, str) and instructions:
            items.insert(0, instructions)
        return self.chat_prompt([item if isinstance(item, dict) else {"content": item} for item in items], tools)

    def prompts(self, prompt: Any) -> int:
        """Tokens of a legacy ``prompt`` or an embeddings ``input``: text, texts, token ids or lists of ids.

        Two levels at most, as the API defines them; anything deeper counts nothing (it was refused
        by validation before counting).
        """
        if isinstance(prompt, str):
            return self.text(prompt)
        if not isinstance(prompt, list):
            return 0
        if all(isinstance(item, int) for item in prompt):
            return len(prompt)
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += self.text(item)
            elif isinstance(item, list) and all(isinstance(i, int) for i in item):
                total += len(item)
        return total


def _collect(value: Any, texts: list[str]) -> int:
    """Gather the strings under ``value`` into ``texts``; returns the fixed-cost tokens (images).

    Walked with a stack, not recursion: the depth of a hostile body can never exhaust Python's.
    """
    extra = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            if item.get("type") in ("image_url", "input_image", "image"):
                extra += TOKENS_PER_IMAGE
                continue
            stack.extend(child for key, child in reversed(item.items()) if key != "type")
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return extra
