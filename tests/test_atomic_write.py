"""One atomic writer (FewShotSAMLib/atomic_write.py) for every file the engine, demo and benchmarks replace: a file is
replaced whole or not at all, whatever happens to the writing process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from FewShotSAMLib.atomic_write import write_atomically, write_text_atomically

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_writes_and_replaces_a_file_readably(tmp_path):
    path = tmp_path / "results" / "speed.json"
    write_text_atomically(path, "first\n")
    write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n"
    assert path.stat().st_mode & 0o044 == 0o044, "a results file must be readable by others"
    assert sorted(p.name for p in path.parent.iterdir()) == ["speed.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "accuracy.md"
    path.write_text("old table\n")
    with pytest.raises(TypeError):
        write_text_atomically(path, b"not text")  # fails inside the write, after the temporary file exists
    assert path.read_text() == "old table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.md"]


def test_ctrl_c_during_the_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.fsam"
    path.write_bytes(b"old model")

    def interrupted(temporary: Path) -> None:
        temporary.write_bytes(b"half a mod")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, interrupted)
    assert path.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fsam"]


def test_the_temporary_file_is_hidden_beside_the_target_and_ends_like_it(tmp_path):
    seen = []
    write_atomically(tmp_path / "case 1.nii.gz", lambda temporary: (seen.append(temporary), temporary.touch()),
                     ending=".nii.gz")
    temporary = seen[0]
    assert temporary.parent == tmp_path and temporary.name.startswith(".case 1.")
    assert temporary.name.endswith(".partial.nii.gz"), "SimpleITK picks the format from the name"
    assert not temporary.exists() and (tmp_path / "case 1.nii.gz").is_file()


def test_overwrite_false_keeps_a_file_that_appeared_during_the_write(tmp_path):
    path = tmp_path / "result.seg.nrrd"

    def someone_else_writes_first(temporary: Path) -> None:
        temporary.write_text("ours")
        path.write_text("theirs")

    with pytest.raises(FileExistsError):
        write_atomically(path, someone_else_writes_first, overwrite=False)
    assert path.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_kill_9_between_write_and_rename_leaves_the_old_file(tmp_path):
    """A real process writes the new file completely, then is killed (SIGKILL, no clean-up possible) before the
    rename: the target still holds the old content, and what is left behind is only the hidden partial file."""
    path = tmp_path / "speed.json"
    path.write_text("old\n")
    writer = textwrap.dedent("""
        import sys, time
        from FewShotSAMLib.atomic_write import write_atomically

        def write_then_wait(temporary):
            temporary.write_text("new\\n")
            print("written", flush=True)
            time.sleep(120)  # killed here, after the write and before the rename

        write_atomically(sys.argv[1], write_then_wait)
    """)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True,
                               env=environment)
    try:
        assert process.stdout.readline().strip() == "written"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert path.read_text() == "old\n"
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".speed.") and leftovers[0].name.endswith(".partial.json")
    assert leftovers[0].read_text() == "new\n", "the kill came after the write was complete"
    write_text_atomically(path, "next\n")  # a later run is not disturbed by the leftover
    assert path.read_text() == "next\n"
