"""Atomic writes: every mode means what it means for open(), and a failure leaves the old file."""

from __future__ import annotations

import pytest

from featurescope._io import atomic_open


def test_write_replaces(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_open(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"


def test_append_keeps_what_was_there(tmp_path):
    target = tmp_path / "log.txt"
    with atomic_open(target, "a") as fh:  # a missing file is created, as open(.., "a") does
        fh.write("one\n")
    with atomic_open(target, "a") as fh:
        fh.write("two\n")
    with atomic_open(target, "ab") as fh:
        fh.write(b"three\n")
    assert target.read_text() == "one\ntwo\nthree\n"


def test_failed_append_leaves_the_old_content(tmp_path):
    target = tmp_path / "log.txt"
    target.write_text("kept\n")

    def crash() -> None:
        with atomic_open(target, "a") as fh:
            fh.write("lost\n")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        crash()
    assert target.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.txt"]


def test_exclusive_creates_once(tmp_path):
    target = tmp_path / "x.txt"
    with atomic_open(target, "x") as fh:
        fh.write("first")
    assert target.read_text() == "first"
    with pytest.raises(FileExistsError):
        atomic_open(target, "x").__enter__()
    assert target.read_text() == "first"


def test_exclusive_refuses_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "x.txt"

    def race() -> None:
        with atomic_open(target, "x") as fh:
            fh.write("mine")
            target.write_text("theirs")  # another writer got there first

    with pytest.raises(FileExistsError):
        race()
    assert target.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


@pytest.mark.parametrize("mode", ["r", "rb", "r+", "wa", "w+x", "wq", "ww"])
def test_modes_that_do_not_write_once_are_refused(tmp_path, mode):
    with pytest.raises(ValueError, match="one of 'w', 'a' or 'x'"):
        atomic_open(tmp_path / "f", mode).__enter__()
    assert not (tmp_path / "f").exists()
