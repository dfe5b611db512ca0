"""The models a tenant can call, as OpenAI lists and retrieves them, and OpenAI's error for any other.

An unknown model is answered as OpenAI answers it (404 ``model_not_found``, OpenAI's wording), which
SDKs and agent frameworks recognise; the configured model ids go to guardproxy's log, not to the
caller, so that the answer does not list what the operator runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from guardproxy.config.models import ModelConfig
from guardproxy.errors import ErrorKind, GuardError

log = logging.getLogger("guardproxy.models")

#: How much of an unknown model name goes into the answer and the log (names are client input).
_NAME_SHOWN = 100


def model_object(name: str, model: ModelConfig) -> dict[str, Any]:
    """One configured model in OpenAI's shape (``GET /v1/models/{id}``, and each item of the list)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": model.upstream}


def model_not_found(name: str, configured: Mapping[str, ModelConfig]) -> GuardError:
    """OpenAI's 404 for ``name``; guardproxy's log names the models that are configured."""
    shown = name[:_NAME_SHOWN]
    log.info("unknown model %r requested; configured models: %s", shown, ", ".join(sorted(configured)) or "(none)")
    return GuardError(ErrorKind.MODEL_NOT_FOUND,
                      f"The model `{shown}` does not exist or you do not have access to it.", param="model")


def retrieve(name: str, configured: Mapping[str, ModelConfig]) -> dict[str, Any]:
    """``GET /v1/models/{name}``: only a configured model's exact id (a dated snapshot that is priced
    as its base model is not listed, so it is not retrieved either)."""
    model = configured.get(name)
    if model is None:
        raise model_not_found(name, configured)
    return model_object(name, model)
