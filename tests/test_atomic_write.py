"""Small text files (results, notes) are replaced whole or not at all."""

from __future__ import annotations

import pytest

from FewShotSAMLib.atomic_text import write_text_atomically


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
