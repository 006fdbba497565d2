"""One Prefect API for a flow and its Dask workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager



@contextmanager
def local_flow_settings() -> Iterator[None]:
    """Settings for a flow run started here (`permanence simulate`, a sweep): no flow-run heartbeats unless the user
    asked for them (PREFECT_FLOWS_HEARTBEAT_FREQUENCY). Prefect 3.8 turns them on by default for zombie detection of
    deployment runs; a local run's heartbeat thread sleeps in 1 s steps and the engine joins it at the end, which
    cost up to 1 s of every flow run (bench/overhead.py). Resume goes through the registry, not heartbeats."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if any(os.environ.get(name) for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


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
    if server.server_process is not None:
        reap_when_gone(os.getpid(), server.server_process.pid)
    # not stopped here: Prefect stops it at exit, after its log and event workers have flushed to it
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


# Polls its parent once a second; when the parent is gone (SIGKILL, a killed terminal: no atexit ran), stops the
# server. Its own session, so a Ctrl-C meant for the sweep does not reach it first.
_WATCHDOG = """
import os, signal, sys, time
parent, child = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
while alive(parent) and alive(child):
    time.sleep(1)
if alive(child):
    os.kill(child, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive(child):
            break
    else:
        os.kill(child, signal.SIGKILL)
"""


def reap_when_gone(parent: int, child: int) -> subprocess.Popen:
    """A watchdog process that stops `child` once `parent` has died: Prefect stops its temporary server at exit, which
    a killed sweep never reaches (its orphaned uvicorn would keep the port and a core's share)."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(parent), str(child)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
