"""The app's one state object, typed: ``create_app``'s lifespan builds an ``AppState`` and yields it as
Starlette lifespan state, which each request gets in ``scope["state"]``; handlers reach it through
``services(request)`` (or ``runtime(request)``), never through untyped attributes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.types import Scope

from guardproxy.config.settings import Config
from guardproxy.http.runtime import Runtime
from guardproxy.http.services import Services

#: The key of the ``AppState`` in the lifespan state (and so in every request's ``scope["state"]``).
STATE_KEY = "guardproxy"


@dataclass(frozen=True)
class AppState:
    """What the lifespan built and every request reads."""

    #: The running configuration and what serves it, replaced whole on reload (``runtime.current``).
    runtime: Runtime
    #: The config the app started with (``requests.body_timeout_s`` reads its ``server`` settings).
    config: Config

    def as_lifespan_state(self) -> Mapping[str, AppState]:
        return {STATE_KEY: self}


def state_of(scope: Scope) -> AppState | None:
    """The ``AppState`` of a request's scope; None before the lifespan ran (or under another app)."""
    state = scope.get("state", {}).get(STATE_KEY)
    return state if isinstance(state, AppState) else None


def app_state(request: HTTPConnection) -> AppState:
    """The ``AppState`` serving ``request``."""
    state = state_of(request.scope)
    if state is None:
        raise RuntimeError("guardproxy's app state is missing: the app must be served with its lifespan")
    return state


def runtime(request: HTTPConnection) -> Runtime:
    """The ``Runtime`` serving ``request`` (for reloads; a handler wants ``services``)."""
    return app_state(request).runtime


def services(request: HTTPConnection) -> Services:
    """The current generation's ``Services``: read once at a request's start, kept to its end."""
    return app_state(request).runtime.current.services
