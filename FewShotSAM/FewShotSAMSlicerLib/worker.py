"""Run the FewShotSAM engine (``python -m FewShotSAMLib ...``) as a separate process and follow it.

Slicer's GUI thread must never run torch and never block, so every heavy step happens in a child process:

- ``WorkerProcess`` starts the command in its own process group (POSIX session / Windows process group), so that
  Cancel can kill the whole tree, and copies its stdout/stderr lines into a queue from two reader threads. The
  reader threads only queue lines; they never touch Slicer, Qt or VTK objects.
- ``StandbyProcessFactory`` keeps one engine process started ahead (``python -m FewShotSAMLib.standby``: torch and
  the model code imported, waiting for its command on stdin), so that a job does not wait seconds for a new
  process's imports; each job still has a process of its own.
- ``WorkerRun`` is polled from the GUI thread (a QTimer in the widget, a loop in tests): it drains the queue,
  turns the engine's ``--progress json`` lines into ``Progress`` reports for a callback, and ends in one of the
  states ``succeeded``, ``failed`` (with the engine's one-line ``fewshotsam: error: ...`` message) or ``cancelled``.

The process is created through a factory (``processFactory(command, env)``) that the logic receives from its
caller, as SlicerNNUNet injects its process runner, so tests run the real worker with a plain virtual-environment
Python and Slicer runs it with PythonSlicer.

This module imports neither ``slicer`` nor ``qt``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

ERROR_PREFIX = "fewshotsam: error:"
DONE_STAGE = "done"
ENGINE_MODULE = "FewShotSAMLib"
STANDBY_MODULE = ENGINE_MODULE + ".standby"

# After a cancel request the tree gets this long to exit on SIGTERM before it is SIGKILLed.
KILL_GRACE_SECONDS = 2.0
# After the process exits, its output pipes normally close at once; a grandchild that escaped the process group
# could keep them open, so the run is considered finished this long after the exit even without end-of-file.
EOF_GRACE_SECONDS = 5.0
STDERR_TAIL_LINES = 400

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Progress:
    """One progress report of the engine; ``fraction`` is the overall fraction done, 0..1."""

    stage: str
    done: int
    total: int
    fraction: float
    message: str

    @property
    def isDone(self) -> bool:
        return self.stage == DONE_STAGE


def parseProgressLine(line: str) -> Progress | None:
    """A ``--progress json`` stdout line as Progress, or None if the line is not a progress report."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or "stage" not in record:
        return None

    def number(key, default, kind):
        try:
            return kind(record.get(key, default))
        except (TypeError, ValueError):
            return default

    fraction = min(1.0, max(0.0, number("fraction", 0.0, float)))
    return Progress(
        stage=str(record.get("stage", "")),
        done=number("done", 0, int),
        total=number("total", 0, int),
        fraction=fraction,
        message=str(record.get("message", "") or ""),
    )


def errorMessageFromStderr(stderrText: str, returnCode: int | None) -> str:
    """The readable one-line reason a worker failed, taken from its stderr.

    The engine reports user errors as ``fewshotsam: error: <one line>``; anything else (a crash, a missing Python
    package) is summarised by the last meaningful stderr line, never the whole traceback.
    """
    lines = [line.strip() for line in (stderrText or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip() or "the worker reported an error"
    codeText = f" (exit code {returnCode})" if returnCode is not None else ""
    for line in reversed(lines):
        if line.startswith(("Traceback", "File ", "~", "^")):
            continue
        if line.startswith("No module named") or "Error" in line.split(":", 1)[0] or ":" in line:
            return f"The FewShotSAM worker failed{codeText}: {line}"
    if lines:
        return f"The FewShotSAM worker failed{codeText}: {lines[-1]}"
    return f"The FewShotSAM worker failed{codeText} without an error message."


def waitWhile(poll: Callable[[], bool], timeout: float | None, interval: float) -> None:
    """Call poll() every interval seconds while it returns True, for at most timeout seconds (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while poll():
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(interval)


def defaultPythonExecutable() -> str:
    """The Python that runs the worker: PythonSlicer inside Slicer, else this interpreter.

    PythonSlicer is Slicer's launcher for its own Python with Slicer's environment (site-packages, library paths),
    so the worker sees exactly the packages installed into Slicer.
    """
    names = ["PythonSlicer.exe", "PythonSlicer"] if os.name == "nt" else ["PythonSlicer"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        besideInterpreter = os.path.join(os.path.dirname(sys.executable or ""), name)
        if os.path.isfile(besideInterpreter):
            return besideInterpreter
    return sys.executable


def engineParentDirectory() -> str | None:
    """The folder that contains the FewShotSAMLib package (to put on the worker's PYTHONPATH), without importing it."""
    try:
        spec = importlib.util.find_spec(ENGINE_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return os.path.dirname(os.path.abspath(locations[0]))
    if spec.origin:
        return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    return None


def workerEnvironment(base: dict | None = None, engineParent: str | None = None) -> dict:
    """Environment of the worker: unbuffered UTF-8 output, and FewShotSAMLib importable."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
    env["PYTHONIOENCODING"] = "utf-8"
    if engineParent:
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if os.path.abspath(engineParent) not in [os.path.abspath(p) for p in paths]:
            env["PYTHONPATH"] = os.pathsep.join([engineParent] + paths)
    return env


def engineCommand(python: str, subcommand: str, arguments: Sequence[str]) -> list[str]:
    return [python, "-m", ENGINE_MODULE, subcommand, *[str(a) for a in arguments]]


def engineArguments(command: Sequence[str]) -> list[str] | None:
    """The engine's arguments (subcommand first) of an engineCommand, or None for any other command."""
    if len(command) > 3 and list(command[1:3]) == ["-m", ENGINE_MODULE]:
        return [str(a) for a in command[3:]]
    return None


def _commonOptions(model=None, checkpoint=None, device=None, axis=None, cacheDir=None, seed=None) -> list[str]:
    options: list[str] = []
    if model:
        options += ["--model", model]
    if checkpoint:
        options += ["--checkpoint", str(checkpoint)]
    if device:
        options += ["--device", device]
    if axis:
        options += ["--axis", axis]
    if cacheDir:
        options += ["--cache-dir", str(cacheDir)]
    if seed is not None:
        options += ["--seed", str(int(seed))]
    return options


def propagateArguments(image, labels, out, model="litemedsam", checkpoint=None, device="auto", axis="auto",
                       cacheDir=None, seed=None, overwrite=False, report=None) -> list[str]:
    """report: a .json path for the confidence report (which slice to paint next); its contents also come back
    in the final "done" line, as WorkerRun.result["report"]."""
    arguments = [str(image), "--labels", str(labels), "--out", str(out)]
    arguments += _commonOptions(model, checkpoint, device, axis, cacheDir, seed)
    if report:
        arguments += ["--report", str(report)]
    if overwrite:
        arguments.append("--overwrite")
    return arguments + ["--progress", "json"]


def adaptArguments(pairs: Sequence[tuple[str, str]], out, model="litemedsam", checkpoint=None, device="auto",
                   axis="auto", cacheDir=None, seed=None, overwrite=False) -> list[str]:
    arguments: list[str] = []
    for image, labels in pairs:
        arguments += ["--image", str(image), "--labels", str(labels)]
    arguments += ["--out", str(out)]
    arguments += _commonOptions(model, checkpoint, device, axis, cacheDir, seed)
    if overwrite:
        arguments.append("--overwrite")
    return arguments + ["--progress", "json"]


def applyArguments(modelFile, images: Sequence[str], outDir, model="litemedsam", checkpoint=None, device="auto",
                   axis="auto", cacheDir=None, overwrite=False) -> list[str]:
    arguments = [str(modelFile), *[str(i) for i in images], "--out-dir", str(outDir)]
    arguments += _commonOptions(model, checkpoint, device, axis, cacheDir)
    if overwrite:
        arguments.append("--overwrite")
    return arguments + ["--progress", "json"]


def _startProcess(command: Sequence[str], env: dict | None, cwd: str | None = None,
                  stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """A child in its own process group (POSIX session / Windows process group), text pipes for its output."""
    options = dict(
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    if os.name == "nt":
        options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                    | getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        options["start_new_session"] = True  # own session = own process group, killed as a whole
    try:
        return subprocess.Popen(list(command), **options)
    except OSError as error:
        raise OSError(f"could not start '{command[0]}': {error.strerror or error}") from error


def _signalProcessTree(process: subprocess.Popen, hard: bool) -> None:
    """SIGTERM (or SIGKILL when hard) to the process and every process it started: its process group, which
    _startProcess gives it. On Windows taskkill /T, which always kills."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        # The group is gone already (or was never ours): make sure the direct child is gone too.
        if process.poll() is None:
            process.kill()


class WorkerProcess:
    """A child process in its own process group whose output lines are queued by reader threads.

    standby: an engine process started ahead (StandbyProcessFactory) that runs this command when start() sends it;
    without one, start() starts a new process.
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None,
                 standby: subprocess.Popen | None = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.standby = standby
        self.startedAhead = False  # True once start() handed the command to a standby process
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._openStreams = 0
        self._readers: list[threading.Thread] = []
        self._killRequestedAt: float | None = None
        self._hardKilled = False
        self._exitSeenAt: float | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("the worker process was already started")
        self._process = self._handOver()
        self.startedAhead = self._process is not None
        if self._process is None:
            self._process = _startProcess(self.command, self.env, self.cwd)
        for stream, channel in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._pump, args=(stream, channel), daemon=True,
                                      name=f"FewShotSAM worker {channel} reader")
            self._openStreams += 1
            self._readers.append(reader)
            reader.start()

    def _handOver(self) -> subprocess.Popen | None:
        """The standby process, told its job; None if there is none or it is gone."""
        standby, self.standby = self.standby, None
        if standby is None:
            return None
        if standby.poll() is None:
            try:
                standby.stdin.write(json.dumps(engineArguments(self.command)) + "\n")
                standby.stdin.close()  # one job per process
                return standby
            except (OSError, ValueError):  # it exited meanwhile
                pass
        _stopStandby(standby)  # its pipes
        return None

    def _pump(self, stream, channel: str) -> None:
        # Runs in a reader thread: only reads and queues text.
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((channel, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put((channel, None))
            try:
                stream.close()
            except OSError:
                pass

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returnCode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def isAlive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def readLines(self) -> list[tuple[str, str]]:
        """Queued (channel, line) pairs, without blocking; also enforces the kill deadline after a cancel."""
        lines = []
        while True:
            try:
                channel, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._openStreams -= 1
            else:
                lines.append((channel, line))
        self._enforceKill()
        return lines

    def isFinished(self) -> bool:
        """True once the process has exited and its output is fully read (or the pipes stayed open too long)."""
        if self._process is None or self._process.poll() is None:
            return False
        if self._exitSeenAt is None:
            self._exitSeenAt = time.monotonic()
        return self._openStreams <= 0 and self._lines.empty() or time.monotonic() - self._exitSeenAt > EOF_GRACE_SECONDS

    def terminate(self) -> None:
        """Ask the whole process tree to stop (SIGTERM to the group); it is killed if still alive after a grace."""
        if self._process is None or self._killRequestedAt is not None:
            return
        self._killRequestedAt = time.monotonic()
        if self._process.poll() is not None and os.name == "nt":
            return
        self._signalTree(hard=False)

    def _enforceKill(self) -> None:
        if self._killRequestedAt is None or self._hardKilled:
            return
        if time.monotonic() - self._killRequestedAt >= KILL_GRACE_SECONDS:
            self._hardKilled = True
            self._signalTree(hard=True)

    def _signalTree(self, hard: bool) -> None:
        _signalProcessTree(self._process, hard)
        if os.name == "nt":  # taskkill has no gentle form
            self._hardKilled = True

    def stop(self, grace: float = KILL_GRACE_SECONDS) -> None:
        """Terminate the tree and block until it is gone: SIGKILL if it is still alive after `grace` seconds.

        For application exit, where no timer polls any more, so the kill deadline of terminate() would never come.
        """
        if self._process is None:
            return
        self.terminate()
        self.wait(grace)
        if not self._hardKilled:  # also whatever the child left running in its process group
            self._hardKilled = True
            self._signalTree(hard=True)
        self.wait(grace)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the process exits (for scripts and tests; the GUI polls instead)."""
        if self._process is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._process.poll() is None:
            self._enforceKill()
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return self._process.returncode


ProcessFactory = Callable[[Sequence[str], dict], WorkerProcess]


def defaultProcessFactory(command: Sequence[str], env: dict) -> WorkerProcess:
    return WorkerProcess(command, env=env)


def _stopStandby(process: subprocess.Popen) -> None:
    """End a standby process that has no job (it holds nothing to save): close its input, kill its group."""
    for stream in (process.stdin, process.stdout, process.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    if process.poll() is None:
        _signalProcessTree(process, hard=True)
    try:
        process.wait(KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass


class StandbyProcessFactory:
    """A ProcessFactory that keeps one engine process started ahead of the next job (FewShotSAMLib.standby).

    A new engine process spends seconds importing torch and the model code before any work; a standby has done
    that while the user painted. ``prepare(python, env)`` starts one (the logic calls it when the module opens
    and whenever a worker ends); a job whose Python and environment match takes it, any other job (or one that
    finds none) starts a new process as defaultProcessFactory does. Taking a standby that is still importing is
    never slower than starting anew. ``close()`` ends the standby (application exit).
    """

    def __init__(self):
        self._standby: subprocess.Popen | None = None
        self._key: tuple | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _keyOf(python: str, env: dict | None) -> tuple:
        return str(python), tuple(sorted((env or {}).items()))

    def __call__(self, command: Sequence[str], env: dict) -> WorkerProcess:
        standby = None
        if engineArguments(command) is not None:
            with self._lock:
                if self._standby is not None and self._key == self._keyOf(command[0], env):
                    standby, self._standby = self._standby, None
        return WorkerProcess(command, env=env, standby=standby)

    @property
    def standbyPid(self) -> int | None:
        """The waiting standby's process id (None if there is none)."""
        with self._lock:
            standby = self._standby
        return standby.pid if standby is not None and standby.poll() is None else None

    def prepare(self, python: str, env: dict) -> None:
        """Start a standby for jobs of this Python and environment, unless a live one is waiting already."""
        key = self._keyOf(python, env)
        with self._lock:
            if self._standby is not None and self._standby.poll() is None and self._key == key:
                return
            previous, self._standby = self._standby, None
        if previous is not None:
            _stopStandby(previous)
        try:
            standby = _startProcess([str(python), "-m", STANDBY_MODULE], env, stdin=subprocess.PIPE)
        except OSError:
            return  # the job that needs it will start its own process and report why it cannot
        with self._lock:
            # Another thread's prepare may have put one there meanwhile: keep one standby, never an orphan.
            replaced, self._standby, self._key = self._standby, standby, key
        if replaced is not None:
            _stopStandby(replaced)

    def close(self) -> None:
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is not None:
            _stopStandby(standby)


class WorkerRun:
    """Follows one worker process from the GUI thread: progress callbacks, then a final status.

    Call ``poll()`` regularly (it never blocks); it returns True while the run is still going. ``wait()`` is the
    blocking equivalent for scripts and tests.
    """

    def __init__(self, process: WorkerProcess, progressCallback: Callable[[Progress], None] | None = None,
                 logCallback: Callable[[str], None] | None = None):
        self.process = process
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.status = RUNNING
        self.errorMessage = ""
        self.lastProgress: Progress | None = None
        self.progressReports: list[Progress] = []
        self.stdoutLines: list[str] = []  # stdout lines that were not progress reports
        self.result: dict = {}  # the engine's final "done" line as sent (outputs, and a propagation's report)
        self._stderrLines: list[str] = []
        self._cancelRequested = False
        self.startedAt: float | None = None
        self.finishedAt: float | None = None

    @property
    def stderrText(self) -> str:
        return "\n".join(self._stderrLines)

    @property
    def isRunning(self) -> bool:
        return self.status == RUNNING

    def start(self) -> "WorkerRun":
        self.startedAt = time.monotonic()
        try:
            self.process.start()
        except OSError as error:
            self.status = FAILED
            self.errorMessage = f"Could not start the FewShotSAM worker: {error}"
            self.finishedAt = time.monotonic()
        return self

    def cancel(self) -> None:
        if self.status != RUNNING:
            return
        self._cancelRequested = True
        self.process.terminate()

    def poll(self) -> bool:
        if self.status != RUNNING:
            return False
        for channel, line in self.process.readLines():
            if channel == "stdout":
                progress = parseProgressLine(line)
                if progress is None:
                    self.stdoutLines.append(line)
                    self._log(line)
                    continue
                self.lastProgress = progress
                self.progressReports.append(progress)
                if progress.isDone:
                    self.result = json.loads(line)
                if self.progressCallback is not None and not self._cancelRequested:
                    self.progressCallback(progress)
            else:
                self._stderrLines.append(line)
                if len(self._stderrLines) > STDERR_TAIL_LINES:
                    del self._stderrLines[: len(self._stderrLines) - STDERR_TAIL_LINES]
                self._log(line)
        if not self.process.isFinished():
            return True
        self._finish()
        return False

    def _finish(self) -> None:
        self.finishedAt = time.monotonic()
        returnCode = self.process.returnCode
        if self._cancelRequested:
            self.status = CANCELLED
            self.errorMessage = "Cancelled by the user."
        elif returnCode == 0:
            self.status = SUCCEEDED
        else:
            self.status = FAILED
            self.errorMessage = errorMessageFromStderr(self.stderrText, returnCode)

    def _log(self, line: str) -> None:
        if self.logCallback is not None:
            self.logCallback(line)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        waitWhile(self.poll, timeout, interval)
        return self.status
