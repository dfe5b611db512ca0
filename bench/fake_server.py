"""guardproxy's fake upstream as the benchmark serves it: the same app, but it keeps no record of requests.

``create_fake_upstream()`` appends every request it receives to a list for tests' assertions; under
load that list grows by hundreds of thousands of dicts, and the garbage collector's passes over it would
slow the upstream down for whichever target is measured last.

Served by ``bench/run.py`` as ``uvicorn --factory fake_server:app --app-dir bench``.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette

from guardproxy.fake_upstream import FakeUpstreamState, create_fake_upstream


class _Discard(list[Any]):
    """A list that stays empty."""

    def append(self, item: Any) -> None:
        pass


def app() -> Starlette:
    """Factory for ``uvicorn --factory``."""
    return create_fake_upstream(
        FakeUpstreamState(requests=_Discard(), headers=_Discard(), stream_endings=_Discard(), paths=_Discard())
    )
