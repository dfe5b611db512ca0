"""The first path segments of OpenAI's API below ``/v1/``: the values a passthrough metric may carry.

A label taken from whatever path a client sends would let any caller add a metric series per
request (5,000 random paths, 5,000 series); a path outside this list counts as ``other``.
"""

from __future__ import annotations

#: OpenAI's API resources (https://platform.openai.com/docs/api-reference), as of 2026.
OPENAI_RESOURCES = frozenset({
    "assistants", "audio", "batches", "chat", "completions", "containers", "conversations", "embeddings",
    "evals", "files", "fine_tuning", "images", "models", "moderations", "organization", "realtime",
    "responses", "threads", "uploads", "vector_stores", "videos",
})
OTHER = "other"


def resource_label(path: str) -> str:
    """The metric label of ``/v1/<path>``: its first segment when that is an OpenAI resource, else ``other``."""
    first = path.split("/", 1)[0]
    return first if first in OPENAI_RESOURCES else OTHER
