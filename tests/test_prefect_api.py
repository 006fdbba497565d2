"""The temporary Prefect server of a sweep does not outlive a killed sweep."""

import signal
import subprocess
import sys
import time

from permanence.adapters.prefect_api import reap_when_gone


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _gone_within(process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return True
        time.sleep(0.1)
    return False


def test_the_watchdog_stops_the_server_once_its_parent_is_killed():
    parent, server = _sleeper(), _sleeper()
    try:
        watchdog = reap_when_gone(parent.pid, server.pid)
        time.sleep(1.5)
        assert server.poll() is None, "the server must keep running while the sweep lives"
        parent.send_signal(signal.SIGKILL)  # not reaped yet: a zombie counts as gone
        assert _gone_within(server, 10), "the watchdog did not stop the orphaned server"
        assert _gone_within(watchdog, 5)
    finally:
        for process in (parent, server):
            if process.poll() is None:
                process.kill()


def test_the_watchdog_leaves_when_the_server_stops_first():
    parent, server = _sleeper(), _sleeper()
    try:
        watchdog = reap_when_gone(parent.pid, server.pid)
        server.terminate()
        server.wait()
        assert _gone_within(watchdog, 5)
        assert parent.poll() is None  # the watchdog never touches the parent
    finally:
        for process in (parent, server):
            if process.poll() is None:
                process.kill()


def test_local_flow_runs_start_no_heartbeat_thread_unless_the_user_asks(monkeypatch):
    from prefect.settings import get_current_settings

    from permanence.adapters.prefect_api import local_flow_settings

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    assert get_current_settings().flows.heartbeat_frequency is not None, "Prefect's own default sends heartbeats"
    with local_flow_settings():
        assert get_current_settings().flows.heartbeat_frequency is None
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with local_flow_settings():  # a team that watches for zombie runs keeps its setting
        assert get_current_settings().flows.heartbeat_frequency is not None
