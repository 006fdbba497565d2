"""One Prefect API for a flow and its Dask workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from permanence.adapters import env  # noqa: F401  (first: Prefect reads its settings when imported)


@contextmanager
def shared_api() -> Iterator[str]:
    """The Prefect API every process of a sweep reports to: PREFECT_API_URL if set (a `prefect server start` that a
    team runs), else a temporary local server started here. Without a URL each Dask worker process would start an
    ephemeral server of its own (seconds each, and they time out on a busy machine)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=180)  # a busy 2-core machine can take a minute
    # not stopped here: Prefect stops it at exit, after its log and event workers have flushed to it
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


class LocalCallback:
    """A callable flow parameter that stays in the flow's process. Prefect ships a flow run's parameters to the Dask
    workers with the run context; a live view (a terminal, locks) cannot travel, and the workers never call it."""

    def __init__(self, fn: Callable[..., None] | None) -> None:
        self.fn = fn

    def __call__(self, *args: object) -> None:
        if self.fn is not None:
            self.fn(*args)

    def __reduce__(self):
        return (LocalCallback, (None,))
