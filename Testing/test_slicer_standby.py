"""The standby engine process (FewShotSAMLib/standby.py, worker.StandbyProcessFactory) with real processes.

A standby imports torch and the model code, then waits for its job's arguments on stdin; these tests hand it real
engine commands (cheap ones: help, and a propagate that fails on a missing file) and check that the job runs in the
process started ahead, that other environments get a process of their own, and that Cancel and exit leave no
process behind. The end-to-end test (test_slicer_propagation_e2e.py) propagates a real scan through standbys.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import slicer_extension_support  # noqa: F401  (puts FewShotSAM/ on sys.path)
from slicer_extension_support import pid_alive

from FewShotSAMSlicerLib import worker as wk

TIMEOUT_S = 300


@pytest.fixture
def env():
    return wk.workerEnvironment(None, wk.engineParentDirectory())


@pytest.fixture
def standbys():
    factory = wk.StandbyProcessFactory()
    yield factory
    factory.close()


def wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def test_a_job_runs_in_the_process_started_ahead(standbys, env, tmp_path):
    standbys.prepare(sys.executable, env)
    waiting = standbys.standbyPid
    assert waiting is not None
    standbys.prepare(sys.executable, env)  # one is waiting already: not replaced
    assert standbys.standbyPid == waiting
    missing = tmp_path / "no-such-scan.nrrd"
    command = wk.engineCommand(sys.executable, "propagate", wk.propagateArguments(
        missing, tmp_path / "labels.nrrd", tmp_path / "out.seg.nrrd", device="cpu"))
    run = wk.WorkerRun(standbys(command, env)).start()
    assert run.process.startedAhead and run.process.pid == waiting
    assert standbys.standbyPid is None  # taken: the next job needs a new one
    assert run.wait(TIMEOUT_S) == wk.FAILED
    assert "no-such-scan.nrrd" in run.errorMessage  # the engine's own one-line error, so it got the arguments
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_the_standby_result_equals_a_new_process(standbys, env):
    command = wk.engineCommand(sys.executable, "propagate", ["--help"])
    standbys.prepare(sys.executable, env)
    ahead = wk.WorkerRun(standbys(command, env)).start()
    fresh = wk.WorkerRun(wk.defaultProcessFactory(command, env)).start()
    assert ahead.wait(TIMEOUT_S) == wk.SUCCEEDED and fresh.wait(TIMEOUT_S) == wk.SUCCEEDED
    assert ahead.process.startedAhead and not fresh.process.startedAhead
    assert ahead.stdoutLines == fresh.stdoutLines and any("--labels" in line for line in ahead.stdoutLines)


def test_other_environments_and_commands_start_their_own_process(standbys, env, tmp_path):
    standbys.prepare(sys.executable, env)
    waiting = standbys.standbyPid
    other = dict(env, FEWSHOTSAM_TEST_MARKER="1")
    help_command = wk.engineCommand(sys.executable, "propagate", ["--help"])
    run = wk.WorkerRun(standbys(help_command, other)).start()
    assert not run.process.startedAhead and run.process.pid != waiting
    assert run.wait(TIMEOUT_S) == wk.SUCCEEDED
    plain = wk.WorkerRun(standbys([sys.executable, "-c", "print('not the engine')"], env)).start()
    assert not plain.process.startedAhead and plain.wait(TIMEOUT_S) == wk.SUCCEEDED
    assert standbys.standbyPid == waiting  # still there for a job it can run
    standbys.prepare(sys.executable, other)  # another environment: the old standby is replaced
    assert wait_gone(waiting) and standbys.standbyPid not in (None, waiting)


@pytest.mark.skipif(os.name == "nt", reason="process-group check uses POSIX signals")
def test_cancel_and_close_leave_no_process(standbys, env, tmp_path):
    standbys.prepare(sys.executable, env)
    command = wk.engineCommand(sys.executable, "propagate", wk.propagateArguments(
        tmp_path / "scan.nrrd", tmp_path / "labels.nrrd", tmp_path / "out.seg.nrrd"))
    run = wk.WorkerRun(standbys(command, env)).start()  # still importing: Cancel must stop it all the same
    assert run.process.startedAhead
    run.cancel()
    assert run.wait(TIMEOUT_S) == wk.CANCELLED and wait_gone(run.process.pid)
    standbys.prepare(sys.executable, env)
    waiting = standbys.standbyPid
    standbys.close()
    assert standbys.standbyPid is None and wait_gone(waiting)


def test_a_standby_without_a_job_exits_quietly_and_refuses_a_bad_job_line(env):
    for job_line, code, message in (("", 0, ""), ("propagate scan.nrrd\n", 2, "one JSON list")):
        done = subprocess.run([sys.executable, "-m", wk.STANDBY_MODULE], input=job_line, capture_output=True,
                              text=True, env=env, timeout=TIMEOUT_S)
        assert done.returncode == code, done.stderr
        assert message in done.stderr and done.stdout == ""
        if not message:
            assert done.stderr == ""


def test_a_job_already_waiting_is_not_delayed_by_the_rehearsal(env):
    """The rehearsal only fills time the user spends painting: a standby whose job line (or end of input) is there
    when its model is built goes straight to the job. A pipe written before the process starts is surely waiting."""
    probe = [sys.executable, "-c", "from FewShotSAMLib.standby import job_waiting; print(job_waiting())"]
    answers = {}
    for case in ("job line", "end of input", "nothing yet"):
        read_end, write_end = os.pipe()
        if case == "job line":
            os.write(write_end, b'["--help"]\n')
        if case != "nothing yet":
            os.close(write_end)
        try:
            answers[case] = subprocess.run(probe, stdin=read_end, capture_output=True, text=True, env=env,
                                           timeout=TIMEOUT_S).stdout.strip()
        finally:
            os.close(read_end)
            if case == "nothing yet":
                os.close(write_end)
    expected = "False" if sys.platform == "win32" else "True"  # Windows' select() takes no pipes: rehearse anyway
    assert answers == {"job line": expected, "end of input": expected, "nothing yet": "False"}


def test_the_module_logic_prepares_the_shared_standby_and_exit_ends_it():
    slicer_extension_support.import_slicer()
    from FewShotSAMSlicerLib import logic as fsLogic

    assert fsLogic.FewShotSAMSlicerLogic().processFactory is fsLogic.STANDBY_WORKERS  # what Slicer runs
    logic = fsLogic.FewShotSAMSlicerLogic(pythonExecutable=sys.executable)
    logic.prepareWorker()
    waiting = fsLogic.STANDBY_WORKERS.standbyPid
    try:
        assert waiting is not None
        assert fsLogic.shutdownAllJobs() == 0  # application exit: no job ran, the standby goes all the same
        assert fsLogic.STANDBY_WORKERS.standbyPid is None and wait_gone(waiting)
    finally:
        fsLogic.STANDBY_WORKERS.close()
