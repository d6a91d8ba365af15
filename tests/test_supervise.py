import os
import signal
import sys
import time

from stemstream.sessions.supervise import ProcessSpec, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_killed_process_is_restarted_with_backoff(tmp_path):
    with Supervisor(backoff_s=0.1) as sup:
        proc = sup.add(ProcessSpec("nodegroup", SLEEPER, log_path=tmp_path / "ng.log"))
        first = proc.pid
        os.kill(first, signal.SIGKILL)
        events = []
        _wait_for(lambda: events.extend(sup.check()) or any(e.kind == "restarted" for e in events))
        kinds = [e.kind for e in events]
        assert kinds.index("died") < kinds.index("restarted")
        died = next(e for e in events if e.kind == "died")
        assert died.exit_code == -signal.SIGKILL and died.pid == first
        assert proc.alive and proc.pid != first and proc.restarts == 1
    assert not proc.alive


def test_gives_up_after_max_restarts():
    with Supervisor(backoff_s=0.01, max_restarts=1) as sup:
        proc = sup.add(ProcessSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"]))
        events = []
        _wait_for(lambda: events.extend(sup.check()) or any(e.kind == "gave_up" for e in events))
        assert proc.restarts == 1
        assert [e.exit_code for e in events if e.kind in ("died", "gave_up")] == [3, 3]
