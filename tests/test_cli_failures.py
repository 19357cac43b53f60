"""Every expected failure of the command line is one line and exit code 1 (Ctrl-C: 130), bugs
keep their traceback, ``--debug`` shows it for any failure, and printed names are inert."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from PIL import Image

import featurescope as fs
from featurescope.cli import _zoo, main
from featurescope.cli._args import positive_int, shown


def _fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make ``featurescope models`` raise ``exc`` from inside its handler."""

    def handler(args: object) -> int:
        raise exc

    monkeypatch.setattr(_zoo, "_models", handler)


def _one_line(err: str, command: str = "models") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"featurescope {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permissions"),
        (errno.EEXIST, "already there"),
    ],
)
def test_disk_failures_are_one_line_naming_the_path(monkeypatch, capsys, code, hint):
    _fail_with(monkeypatch, OSError(code, os.strerror(code), "/data/out/index.npy"))
    assert main(["models"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"{os.strerror(code)}: '/data/out/index.npy'" in line
    assert hint in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_a_real_read_only_folder_is_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "alexnet_half.pt"
    torch.save(fs.create_model("alexnet_half", num_classes=3).state_dict(), checkpoint)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code = main(
            ["convert", str(checkpoint), str(locked / "x.safetensors"), "--model", "alexnet_half"]
        )
    finally:
        locked.chmod(0o700)
    assert code == 1
    line = _one_line(capsys.readouterr().err, "convert")
    assert "Permission denied" in line and str(locked) in line


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "featurescope models: interrupted\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    _fail_with(monkeypatch, ZeroDivisionError("a real bug"))
    with pytest.raises(ZeroDivisionError, match="a real bug"):
        main(["models"])


@pytest.mark.parametrize("argv", [["--debug", "models"], ["models", "--debug"]])
def test_debug_shows_the_traceback_of_an_expected_failure(monkeypatch, capsys, argv):
    _fail_with(monkeypatch, fs.FeaturescopeError("no such thing"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "featurescope models: error: no such thing"


@pytest.mark.parametrize(
    "exc",
    [
        AssertionError("Torch not compiled with CUDA enabled"),
        RuntimeError("Found no NVIDIA driver on your system."),
        RuntimeError("CUDA error: no CUDA-capable device is detected\nCUDA kernel errors..."),
    ],
)
def test_a_missing_cuda_device_is_one_line(monkeypatch, capsys, exc):
    _fail_with(monkeypatch, exc)
    assert main(["models"]) == 1
    assert "--device cpu" in _one_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torch_s_own_missing_cuda_error_is_one_line(monkeypatch, capsys):
    def handler(args: object) -> int:
        torch.zeros(1, device="cuda")
        return 0

    monkeypatch.setattr(_zoo, "_models", handler)
    assert main(["models"]) == 1
    assert "--device cpu" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(("side", "what"), [(12, "warning"), (20, "error")])
def test_a_decompression_bomb_query_image_is_one_line(tmp_path, monkeypatch, capsys, side, what):
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: 144 and 400 pixels here.
    image = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert main(["maps", str(image), "--out", str(tmp_path / "out")]) == 1
    line = _one_line(capsys.readouterr().err, "maps")
    assert "too large to decode safely" in line


def test_control_characters_in_a_name_are_escaped(tmp_path, capsys):
    evil = str(tmp_path / "evil\x1b[2J\nname.png")
    assert main(["maps", evil]) == 1
    line = _one_line(capsys.readouterr().err, "maps")
    assert "\x1b" not in line
    assert "evil\\x1b[2J\\nname.png" in line


def test_an_error_message_with_an_undecodable_name_prints_its_byte(monkeypatch, capsys):
    name = os.fsdecode(b"/photos/caf\xe9.png")
    _fail_with(monkeypatch, OSError(errno.EACCES, "Permission denied", name))
    assert main(["models"]) == 1
    assert "'/photos/caf\\xe9.png'" in _one_line(capsys.readouterr().err)


def test_shown_escapes_what_a_terminal_would_act_on() -> None:
    assert shown("photos/cat.png") == "photos/cat.png"
    assert shown("ünïcode 猫.png") == "ünïcode 猫.png"
    assert shown("a\x1b]0;title\x07b") == "a\\x1b]0;title\\x07b"
    assert shown("right\u202eto-left") == "right\\u202eto-left"
    assert shown(os.fsencode("x") + b"\xff") == "x\\xff"


@pytest.mark.parametrize("option", ["--batch-size", "--epochs"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_train_refuses_non_positive_numbers(capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "alexnet", option, value])
    assert exit_.value.code == 2
    assert f"expected a positive whole number, got '{value}'" in capsys.readouterr().err


def test_positive_int_accepts_positive_whole_numbers() -> None:
    assert [positive_int(v) for v in ("1", "64", " 7")] == [1, 64, 7]
