"""Worker process handling (FewShotSAMSlicerLib/worker.py) with real child processes.

These tests start real Python processes that print like the engine does (JSON progress lines on stdout,
``fewshotsam: error: ...`` on stderr), so the reading, progress, error and cancel paths are exercised for real,
independently of the model. The end-to-end tests run the engine itself.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest
import slicer_extension_support  # noqa: F401  (puts FewShotSAM/ on sys.path)
from slicer_extension_support import pid_alive

from FewShotSAMSlicerLib import worker as wk


def python_script(tmp_path, body: str) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


# ---- parsing -------------------------------------------------------------------------------------------------
def test_parse_progress_line():
    progress = wk.parseProgressLine('{"stage": "encode", "done": 3, "total": 31, "fraction": 0.25, "message": "x"}')
    assert progress == wk.Progress("encode", 3, 31, 0.25, "x")
    assert wk.parseProgressLine('{"stage": "done", "done": 1, "total": 1, "fraction": 1.0, "message": ""}').isDone
    assert wk.parseProgressLine("Loading model...") is None
    assert wk.parseProgressLine("{not json") is None
    assert wk.parseProgressLine('{"no_stage": 1}') is None
    assert wk.parseProgressLine('{"stage": "x", "fraction": 7}').fraction == 1.0


def test_error_message_is_the_engine_line_not_the_traceback():
    stderr = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n" \
             "fewshotsam: error: labels.nrrd: no painted slice found\n"
    assert wk.errorMessageFromStderr(stderr, 2) == "labels.nrrd: no painted slice found"
    crash = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
             "ModuleNotFoundError: No module named 'torch'\n")
    message = wk.errorMessageFromStderr(crash, 1)
    assert message.endswith("ModuleNotFoundError: No module named 'torch'") and "Traceback" not in message
    assert "exit code 9" in wk.errorMessageFromStderr("", 9)


def test_commands():
    arguments = wk.propagateArguments("i.nrrd", "l.nrrd", "o.nrrd", model="sam_vit_b", checkpoint="c.pth",
                                      device="cpu", axis="coronal", cacheDir="/c")
    assert arguments == ["i.nrrd", "--labels", "l.nrrd", "--out", "o.nrrd", "--model", "sam_vit_b", "--checkpoint",
                         "c.pth", "--device", "cpu", "--axis", "coronal", "--cache-dir", "/c", "--progress", "json"]
    withReport = wk.propagateArguments("i.nrrd", "l.nrrd", "o.nrrd", report="r.json")
    assert withReport[withReport.index("--report") + 1] == "r.json"
    command = wk.engineCommand("py", "propagate", arguments)
    assert command[:4] == ["py", "-m", "FewShotSAMLib", "propagate"]
    assert wk.adaptArguments([("a", "la"), ("b", "lb")], "m.fsam")[:9] == [
        "--image", "a", "--labels", "la", "--image", "b", "--labels", "lb", "--out"]
    assert wk.applyArguments("m.fsam", ["x", "y"], "d")[:5] == ["m.fsam", "x", "y", "--out-dir", "d"]


def test_environment_puts_engine_first_and_unbuffers(tmp_path):
    env = wk.workerEnvironment({"PYTHONPATH": "/a"}, str(tmp_path))
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/a"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert wk.workerEnvironment({"PYTHONPATH": str(tmp_path)}, str(tmp_path))["PYTHONPATH"] == str(tmp_path)


def test_default_python_outside_slicer_is_this_interpreter():
    if not any(os.path.isfile(os.path.join(p, "PythonSlicer")) for p in os.environ.get("PATH", "").split(os.pathsep)):
        assert wk.defaultPythonExecutable() == sys.executable


# ---- real processes ------------------------------------------------------------------------------------------
def test_run_reports_progress_and_succeeds(tmp_path):
    command = python_script(tmp_path, """
        import json, sys, time
        print("a plain log line")
        for n in range(1, 4):
            print(json.dumps({"stage": "propagate", "done": n, "total": 3, "fraction": n / 4, "message": f"slice {n}"}))
            time.sleep(0.05)
        print(json.dumps({"stage": "done", "done": 1, "total": 1, "fraction": 1.0, "message": "finished",
                          "report": {"slice_axis": 0}}))
        print("warning on stderr", file=sys.stderr)
    """)
    reports, logs = [], []
    run = wk.WorkerRun(wk.WorkerProcess(command, env=wk.workerEnvironment()), progressCallback=reports.append,
                       logCallback=logs.append).start()
    assert run.wait(timeout=30) == wk.SUCCEEDED
    assert [r.message for r in reports] == ["slice 1", "slice 2", "slice 3", "finished"]
    assert reports[-1].isDone and run.lastProgress.fraction == 1.0
    assert run.result["report"] == {"slice_axis": 0}  # the done line's payload, as the engine sent it
    assert "a plain log line" in run.stdoutLines and "warning on stderr" in logs


def test_run_failure_gives_the_one_line_message(tmp_path):
    command = python_script(tmp_path, """
        import sys
        print("Traceback (most recent call last):", file=sys.stderr)
        print("fewshotsam: error: image.nrrd: the file is not a 3D image", file=sys.stderr)
        sys.exit(2)
    """)
    run = wk.WorkerRun(wk.WorkerProcess(command)).start()
    assert run.wait(timeout=30) == wk.FAILED
    assert run.errorMessage == "image.nrrd: the file is not a 3D image"


def test_missing_executable_fails_readably(tmp_path):
    run = wk.WorkerRun(wk.WorkerProcess([str(tmp_path / "no-such-python"), "-m", "x"])).start()
    assert run.status == wk.FAILED and "Could not start the FewShotSAM worker" in run.errorMessage


def test_poll_never_blocks(tmp_path):
    command = python_script(tmp_path, "import time; time.sleep(3)")
    run = wk.WorkerRun(wk.WorkerProcess(command)).start()
    started = time.monotonic()
    for _ in range(20):
        assert run.poll()
    assert time.monotonic() - started < 0.5
    run.cancel()
    assert run.wait(timeout=30) == wk.CANCELLED


@pytest.mark.skipif(os.name == "nt", reason="process-group check uses POSIX signals")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    command = python_script(tmp_path, f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print(json.dumps({{"stage": "encode", "done": 0, "total": 10, "fraction": 0.0, "message": "started"}}))
        time.sleep(600)
    """)
    reports = []
    run = wk.WorkerRun(wk.WorkerProcess(command), progressCallback=reports.append).start()
    deadline = time.monotonic() + 30
    while not reports and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert reports, "the fake worker did not report"
    grandchild = int(pid_file.read_text())
    worker_pid = run.process.pid
    run.cancel()
    assert run.wait(timeout=30) == wk.CANCELLED
    deadline = time.monotonic() + 10
    while (pid_alive(grandchild) or pid_alive(worker_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(worker_pid) and not pid_alive(grandchild)


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM handling is POSIX")
def test_cancel_escalates_to_kill_when_sigterm_is_ignored(tmp_path):
    command = python_script(tmp_path, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """)
    run = wk.WorkerRun(wk.WorkerProcess(command)).start()
    deadline = time.monotonic() + 30
    while "ready" not in run.stdoutLines and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    started = time.monotonic()
    run.cancel()
    assert run.wait(timeout=30) == wk.CANCELLED
    assert time.monotonic() - started < wk.KILL_GRACE_SECONDS + 5


# ---- jobs made of several worker runs (FewShotSAMSlicerLib/logic.py) -------------------------------------------
def test_grouping_keeps_segments_painted_on_the_same_slices_together():
    from FewShotSAMSlicerLib.logic import groupSegmentsBySlices

    painted = {"liver": [9, 12, 15], "spleen": [15, 12, 9], "rk": [18, 21], "lk": [18, 21], "x": [3]}
    assert groupSegmentsBySlices(painted, ["liver", "rk", "lk", "spleen", "x"]) == [
        ["liver", "spleen"], ["rk", "lk"], ["x"]]


def make_job(tmp_path, bodies, on_success, progress=None):
    from FewShotSAMSlicerLib import logic as fsLogic

    steps = []
    for number, body in enumerate(bodies):
        script = tmp_path / f"step{number}.py"
        script.write_text(textwrap.dedent(body))
        steps.append(fsLogic.WorkerStep([sys.executable, str(script)], wk.workerEnvironment(), f"group {number}"))
    folder = tmp_path / "job-folder"
    folder.mkdir()
    return fsLogic.FewShotSAMJob("propagate", steps, wk.defaultProcessFactory, str(folder), on_success,
                                 progressCallback=progress)


STEP_OK = """
    import json
    for n in (1, 2):
        print(json.dumps({"stage": "propagate", "done": n, "total": 2, "fraction": n / 2, "message": f"part {n}"}))
"""


def test_job_runs_its_steps_in_order_then_writes_once(tmp_path):
    calls, reports = [], []
    job = make_job(tmp_path, [STEP_OK, STEP_OK], lambda j: calls.append(j.stepIndex) or "written",
                   progress=lambda f, m: reports.append((round(f, 3), m)))
    assert job.wait(60) == "succeeded" and job.result == "written" and calls == [1]
    assert [m for _, m in reports[:4]] == ["[1/2 group 0] part 1", "[1/2 group 0] part 2",
                                           "[2/2 group 1] part 1", "[2/2 group 1] part 2"]
    assert [f for f, _ in reports] == sorted(f for f, _ in reports) and reports[-1] == (1.0, "Done")
    assert not (tmp_path / "job-folder").exists()


def test_job_stops_at_the_first_failing_step(tmp_path):
    calls = []
    failing = "import sys; print('fewshotsam: error: labels-2.nrrd: nothing painted', file=sys.stderr); sys.exit(2)"
    job = make_job(tmp_path, [STEP_OK, failing, STEP_OK], lambda j: calls.append(1))
    assert job.wait(60) == "failed"
    assert job.errorMessage == "labels-2.nrrd: nothing painted" and calls == [] and len(job.runs) == 2


def test_cancel_stops_the_chain(tmp_path):
    calls = []
    slow = "import json, time; print(json.dumps({'stage': 'encode', 'fraction': 0.1}), flush=True); time.sleep(600)"
    job = make_job(tmp_path, [slow, STEP_OK], lambda j: calls.append(1))
    job.progressCallback = lambda f, m: job.cancel()
    assert job.wait(60) == "cancelled" and calls == [] and len(job.runs) == 1


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM handling is POSIX")
def test_shutdown_at_application_exit_kills_without_polling_and_removes_the_folder(tmp_path):
    """Slicer's exit (module cleanup) calls job.shutdown(): no timer polls after it, so the SIGKILL escalation and
    the temporary folder's removal must happen inside that call (before, the worker only got SIGTERM)."""
    stubborn = ("import json, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print(json.dumps({'stage': 'encode', 'fraction': 0.1}), flush=True); time.sleep(600)")
    calls, finished = [], []
    job = make_job(tmp_path, [stubborn], lambda j: calls.append(1))
    job.finishedCallback = finished.append
    deadline = time.monotonic() + 30
    while job.run.lastProgress is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.run.lastProgress is not None, "the fake worker did not start"
    pid = job.pid
    started = time.monotonic()
    job.shutdown(grace=0.5)
    assert time.monotonic() - started < 5
    assert not pid_alive(pid), "the worker survived the application exit"
    assert job.status == "cancelled" and calls == [] and finished == []
    assert not (tmp_path / "job-folder").exists(), "the temporary folder was left behind"


def test_application_exit_stops_every_running_job(tmp_path):
    from FewShotSAMSlicerLib import logic as fsLogic

    slow = "import json, time; print(json.dumps({'stage': 'encode', 'fraction': 0.1}), flush=True); time.sleep(600)"
    job = make_job(tmp_path, [slow], lambda j: None)
    pid = job.pid
    assert fsLogic.shutdownAllJobs() >= 1
    assert job.status == "cancelled" and not pid_alive(pid) and not (tmp_path / "job-folder").exists()
    assert fsLogic.shutdownAllJobs() == 0
