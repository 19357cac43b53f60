"""The command line's small courtesies: one-line errors, devices that are not there, hints,
positional arguments no option swallows, skipped files in one line, checks before a model is
built, and ``--help``/``--version`` without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import featurescope as fs
from featurescope._torch_utils import resolve_device
from featurescope.cli import _study, build_parser, main


def _image(folder: Path, name: str = "photo.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (10, 200, 90)).save(folder / name)
    return folder / name


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"featurescope {command}: error: ")
    return lines[0]


@pytest.fixture
def never_built(monkeypatch):
    """Fails the test if a command builds its model."""

    def build_model(args):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(_study, "build_model", build_model)


# --- devices ------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("command", [["maps", "{image}"], ["index", "build", "{folder}"]])
def test_a_missing_gpu_is_one_line_before_the_model_is_built(
    tmp_path, command, no_gpu, never_built, capsys
):
    image = _image(tmp_path / "photos")
    argv = [a.format(image=image, folder=image.parent) for a in command]
    out = ["--out", str(tmp_path / "out")]
    assert main([*argv, "--device", "cuda", *out]) == 1
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert "device 'cuda' is not available" in line and "'cpu'" in line


def test_train_and_demo_check_the_device_too(tmp_path, no_gpu, capsys):
    assert main(["train", "alexnet_half", "--device", "cuda:0", "--out", str(tmp_path)]) == 1
    assert "device 'cuda:0' is not available" in _one_error_line(capsys.readouterr().err, "train")
    assert main(["demo", "--device", "gpu", "--out", str(tmp_path)]) == 1
    assert "'gpu' is not a device" in _one_error_line(capsys.readouterr().err, "demo")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(fs.FeaturescopeError, match=r"has 2 cuda device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(fs.FeaturescopeError, match="torch sees no cuda device"):
        resolve_device(torch.device("cuda", 0))


# --- hints -------------------------------------------------------------------------------------


def test_a_bare_family_name_hints_at_its_pattern(capsys):
    assert main(["models", "resnet"]) == 1
    line = _one_error_line(capsys.readouterr().err, "models")
    assert "did you mean the pattern 'resnet*'?" in line
    assert all(name in line for name in fs.list_models("resnet*")[:5])
    assert main(["models", "alexnett*"]) == 1
    line = _one_error_line(capsys.readouterr().err, "models")
    assert "Did you mean: 'alexnet'" in line


# --- positional arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["maps", "--layers", "conv9", "photo.jpg"], {"image": "photo.jpg", "layers": ["conv9"]}),
        (
            ["maps", "--layers", "conv1,conv2", "--layers", "fc", "photo.jpg"],
            {"image": "photo.jpg", "layers": ["conv1", "conv2", "fc"]},
        ),
        (["maps", "photo.jpg", "--layers", "conv1"], {"image": "photo.jpg", "layers": ["conv1"]}),
        (
            ["summary", "--nodes", "conv1,fc", "alexnet_half"],
            {"model": "alexnet_half", "nodes": ["conv1", "fc"]},
        ),
        (
            ["convert", "--class-names", "cat,dog", "a.pt", "b.safetensors", "--model", "alexnet"],
            {"src": "a.pt", "dst": "b.safetensors", "class_names": ["cat", "dog"]},
        ),
    ],
)
def test_options_do_not_swallow_positional_arguments(argv, expected):
    args = build_parser().parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


def test_names_after_a_list_option_are_refused_with_the_way_to_write_them(capsys):
    with pytest.raises(SystemExit) as info:
        main(["maps", "photo.jpg", "--layers", "conv1", "conv2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: conv2" in err and "--layers conv1,conv2" in err
    with pytest.raises(SystemExit):
        main(["maps", "photo.jpg", "--layers", "conv1,,conv2"])
    assert "expected NAME[,NAME...]" in capsys.readouterr().err


# --- skipped files ------------------------------------------------------------------------------


def test_skipped_files_are_one_plain_line(tmp_path, capsys):
    photos = tmp_path / "photos"
    for name in ("a.png", "b.png"):
        _image(photos, name)
    (photos / "notes.txt").write_text("shopping list")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "photos.fsindex"
    argv = ["index", "build", str(photos), "--model", "alexnet_half", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if "skipped" in line]
    assert skipped == [
        f"featurescope: skipped 2 of 4 files in {photos} (not readable images): broken.jpg "
        "(UnidentifiedImageError: cannot identify image file); notes.txt (not an image file "
        "(.txt))"
    ]
    assert not any("Warning" in line or "warnings.warn" in line for line in err)
    # The Python API still warns, as a SkippedFilesWarning.
    with pytest.warns(fs.data.SkippedFilesWarning, match="skipped 2 of 4 files"):
        fs.data.ImageFolder(photos)


# --- arguments checked before the model is built -------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "command", "said"),
    [
        (["maps", "{tmp}/missing.jpg"], "maps", "image '{tmp}/missing.jpg' does not exist"),
        (["maps", "{tmp}"], "maps", "image '{tmp}' is a folder, not a file"),
        (["maps", "{tmp}/notes.txt"], "maps", "cannot read image '{tmp}/notes.txt'"),
        (["maps", "{tmp}/p/photo.png", "--out", "{tmp}/notes.txt"], "maps", "is a file"),
        (["index", "build", "{tmp}/nowhere"], "index", "image folder '{tmp}/nowhere' does not"),
        (
            ["index", "build", "{tmp}/p", "--out", "{tmp}/p"],
            "index",
            "--out '{tmp}/p' is an existing folder without search.json",
        ),
    ],
)
def test_arguments_are_checked_before_the_model_is_built(
    tmp_path, argv, command, said, never_built, capsys
):
    _image(tmp_path / "p")
    (tmp_path / "notes.txt").write_text("not an image")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    assert said.format(tmp=tmp_path) in _one_error_line(capsys.readouterr().err, command)


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    image = _image(tmp_path)
    argv = ["maps", str(image), "--weights", str(tmp_path / "best.safetensors")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err, "maps")


# --- fast --help and --version -----------------------------------------------------------------

_TORCH_FREE = """
import sys
from featurescope.cli import main
for argv in ({argvs}):
    try:
        main(argv)
    except SystemExit:
        pass
import featurescope
featurescope.__version__, featurescope.FeaturescopeError, featurescope.hookimpl
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy")))
"""


def test_help_and_version_do_not_import_torch():
    argvs = [["--version"], ["--help"], ["maps", "--help"], ["index", "build", "--help"], []]
    done = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE.format(argvs=", ".join(map(repr, argvs)))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines()[-1] == "[]"
    assert "featurescope 0" in done.stdout and "--weights" in done.stdout


def test_the_package_root_imports_every_public_name_on_first_use():
    assert set(fs.__all__) <= set(dir(fs))
    for name in fs.__all__:
        assert getattr(fs, name) is not None, name
    assert fs.create_model is fs.zoo.create_model and fs.tap.FeatureTap is fs.FeatureTap
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fs.nope  # noqa: B018


def test_the_type_checkers_imports_are_the_lazy_ones():
    """The ``if TYPE_CHECKING:`` imports of ``__init__.py`` name the same modules and names as
    ``_LAZY``, so that what mypy sees is what ``__getattr__`` gives."""
    tree = ast.parse(Path(fs.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    imported = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == fs._LAZY
    assert set(fs._LAZY) <= set(fs.__all__)


@pytest.mark.slow
def test_the_function_compare_stays_the_function_when_its_subpackage_is_imported_later():
    script = (
        "import featurescope as fs, featurescope.compare._plan, types;"
        "print(callable(fs.compare), isinstance(fs.compare, types.ModuleType), "
        "fs.compare.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "False", "featurescope.compare._compare"]
