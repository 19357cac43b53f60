"""Safe checkpoints: safetensors round trips, atomic saves, remapped layouts, refused pickles."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch
from torch import nn

import featurescope as fs
from featurescope.zoo import checkpoints


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["alexnet", "alexnet_half"])
def test_safetensors_round_trip(tmp_path, name):
    model = fs.create_model(name, num_classes=3)
    path = fs.zoo.save_checkpoint(
        model, tmp_path / "m.safetensors", class_names=["a", "b", "c"], epoch=4, acc=0.5
    )
    meta = fs.zoo.read_checkpoint_metadata(path)
    assert meta["model"] == name
    assert meta["num_classes"] == 3
    assert meta["class_names"] == ["a", "b", "c"]
    assert meta["epoch"] == 4 and meta["acc"] == 0.5
    assert meta["featurescope_version"] == fs.__version__

    loaded = fs.zoo.load_checkpoint(path)
    assert not loaded.training
    assert fs.model_metadata(loaded).class_names == ("a", "b", "c")
    _same_weights(model, loaded)
    again = fs.create_model(name, checkpoint=path)
    _same_weights(model, again)
    x = torch.randn(2, 3, 227, 227)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_class_names_must_match_num_classes(tmp_path):
    with pytest.raises(fs.errors.CheckpointError, match="2 class names"):
        fs.zoo.save_checkpoint(
            fs.create_model("alexnet_half"), tmp_path / "x.safetensors", class_names=["a", "b"]
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(fs.errors.CheckpointError, match="JSON"):
        fs.zoo.save_checkpoint(
            fs.create_model("alexnet_half"), tmp_path / "x.safetensors", bad=object()
        )


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    first = fs.create_model("alexnet_half")
    fs.zoo.save_checkpoint(first, path)
    before = path.read_bytes()

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def crash_halfway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(1000)  # a partly written file...
        raise OSError("disk full")  # ...and then the crash

    monkeypatch.setattr(safetensors.torch, "save_file", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left
    _same_weights(first, fs.zoo.load_checkpoint(path))


def _study_features_layout(model: fs.zoo.AlexNet) -> collections.OrderedDict:
    """The study's other code layout: torchvision-style ``features``/``classifier``."""
    features = nn.Sequential(*model.conv1, *model.conv2, *model.conv3)
    state = collections.OrderedDict()
    for k, v in features.state_dict().items():
        state[f"features.{k}"] = v.clone()
    for k, v in model.fc.state_dict().items():
        state[f"classifier.{k}"] = v.clone()
    return state


@pytest.mark.parametrize("name", ["alexnet", "alexnet_half"])
def test_study_layouts_load_with_identical_outputs(tmp_path, name):
    source = fs.create_model(name).eval()
    features_layout = _study_features_layout(source)
    assert "features.10.weight" in features_layout and "classifier.5.weight" in features_layout
    stage_layout = source.state_dict()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        expected = source(x)
    for i, state in enumerate([features_layout, stage_layout]):
        path = tmp_path / f"study{i}.pt"
        torch.save(state, path)
        model = fs.create_model(name, checkpoint=path)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_torchvision_style_dropout_first_classifier_also_maps():
    source = fs.create_model("alexnet").eval()
    state = _study_features_layout(source)
    # torchvision's classifier puts Dropout first: linears at 1, 4, 6.
    renamed = collections.OrderedDict()
    for k, v in state.items():
        if k.startswith("classifier."):
            index, rest = k[len("classifier.") :].split(".", 1)
            k = f"classifier.{ {'0': 1, '3': 4, '5': 6}[index] }.{rest}"
        renamed[k] = v
    model = fs.create_model("alexnet")
    model.load_state_dict(renamed)
    _same_weights(source, model)


def test_wrapped_and_data_parallel_state_dicts(tmp_path):
    source = fs.create_model("alexnet_half")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "w.pth")
    _same_weights(source, fs.zoo.load_checkpoint(tmp_path / "w.pth", model_name="alexnet_half"))


def test_plain_state_dict_infers_num_classes(tmp_path):
    source = fs.create_model("alexnet_half", num_classes=9)
    torch.save(source.state_dict(), tmp_path / "s.pt")
    model = fs.zoo.load_checkpoint(tmp_path / "s.pt", model_name="alexnet_half")
    assert model.fc[5].out_features == 9
    with pytest.raises(fs.errors.CheckpointError, match="model_name"):
        fs.zoo.load_checkpoint(tmp_path / "s.pt")
    with pytest.raises(fs.errors.CheckpointError, match="num_classes"):
        fs.create_model("alexnet_half", num_classes=5, checkpoint=tmp_path / "s.pt")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    torch.save(fs.create_model("alexnet_half").state_dict(), tmp_path / "half.pt")
    with pytest.raises(fs.errors.CheckpointError, match="do not fit"):
        fs.create_model("alexnet", checkpoint=tmp_path / "half.pt")


class _Trap:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Trap(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(fs.errors.UnsafeCheckpointError, match="trust-pickle"):
        fs.zoo.load_checkpoint(path, model_name="alexnet")
    with pytest.raises(fs.errors.UnsafeCheckpointError):
        fs.create_model("alexnet", checkpoint=path)
    with pytest.raises(fs.errors.UnsafeCheckpointError):
        fs.zoo.convert_checkpoint(path, tmp_path / "out.safetensors", model_name="alexnet")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


STUDY_SCRIPT = """
import torch, torch.nn as nn
class AlexNet(nn.Module):  # the study's own class, defined in its script
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 48, 11, 4), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.conv2 = nn.Sequential(nn.Conv2d(48, 128, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.conv3 = nn.Sequential(nn.Conv2d(128, 192, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(192, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.fc = nn.Sequential(nn.Linear(128 * 36, 2048), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(2048, 2048), nn.ReLU(inplace=True), nn.Linear(2048, 5))
    def forward(self, x):
        return self.fc(torch.flatten(self.conv3(self.conv2(self.conv1(x))), 1))
torch.manual_seed(1)
model = AlexNet().eval()
torch.save(model, {model!r})
torch.save(model.state_dict(), {state!r})
"""


@pytest.mark.slow
def test_convert_a_pickled_whole_model_from_the_study(tmp_path):
    pickled, state = tmp_path / "model.pth", tmp_path / "state.pt"
    script = STUDY_SCRIPT.format(model=str(pickled), state=str(state))
    subprocess.run([sys.executable, "-c", script], check=True)

    with pytest.raises(fs.errors.UnsafeCheckpointError, match="arbitrary|code"):
        fs.zoo.load_checkpoint(pickled, model_name="alexnet_half")
    out = fs.zoo.convert_checkpoint(
        pickled, tmp_path / "model.safetensors", model_name="alexnet_half", trust_pickle=True
    )
    converted = fs.zoo.load_checkpoint(out)
    reference = fs.zoo.load_checkpoint(state, model_name="alexnet_half")
    _same_weights(reference, converted)
    assert fs.zoo.read_checkpoint_metadata(out)["converted_from"] == "model.pth"


def test_cli_convert(tmp_path, capsys):
    from featurescope.cli import main

    torch.save(fs.create_model("alexnet_half").state_dict(), tmp_path / "s.pt")
    code = main(
        [
            "convert",
            str(tmp_path / "s.pt"),
            str(tmp_path / "s.safetensors"),
            "--model",
            "alexnet_half",
        ]
    )
    assert code == 0
    assert fs.zoo.read_checkpoint_metadata(tmp_path / "s.safetensors")["model"] == "alexnet_half"

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Trap(str(tmp_path / "pwned"))}, evil)
    code = main(["convert", str(evil), str(tmp_path / "e.safetensors"), "--model", "alexnet"])
    assert code == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b"not a checkpoint at all",
        b"PK\x03\x04garbage",
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":',
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path, corrupt):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt)
    with pytest.raises(fs.errors.CheckpointError):
        fs.create_model("alexnet", checkpoint=path)


def test_truncated_safetensors(tmp_path):
    path = fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fs.errors.CheckpointError, match="truncated or corrupt"):
        fs.zoo.load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(fs.errors.CheckpointError, match="does not exist"):
        fs.zoo.load_checkpoint(tmp_path / "nope.safetensors")


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(fs.errors.CheckpointError, match="state dict"):
        checkpoints.read_state_dict(tmp_path / "list.pt")


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from featurescope._io import atomic_open

    umask = os.umask(0o022)
    os.umask(umask)  # reading the umask means setting it; put it straight back
    with atomic_open(tmp_path / "new.txt") as fh:
        fh.write("x")
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "new.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    (tmp_path / "new.txt").chmod(0o600)
    with atomic_open(tmp_path / "new.txt") as fh:
        fh.write("y")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o600  # kept on replace


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"layer sizes: 96 256 384\nlr 0.01\n", "it looks like text ('layer sizes: 96 256 384')"),
        ("naïve notes, ünïcode\n".encode(), "it looks like text ('naïve notes, ünïcode')"),
        (b"", "the file is empty"),
        (b"\x00\x01\x02\xff\xfe binary", r"it starts with the bytes b'\x00\x01\x02\xff\xfe bi'"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_so_not_as_a_pickle(tmp_path, content, said):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(fs.errors.CheckpointError) as info:
        checkpoints.read_state_dict(path)
    assert not isinstance(info.value, fs.errors.UnsafeCheckpointError)
    assert str(info.value).startswith(f"{path} is not a checkpoint: {said}.")
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("zipped", [True, False])
def test_both_torch_save_formats_still_read(tmp_path, zipped):
    """The first-bytes check lets torch.save's zip and legacy pickle formats through."""
    state = fs.create_model("alexnet_half").state_dict()
    path = tmp_path / "s.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    read = checkpoints.read_state_dict(path)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)


# --- untrusted headers: bounded by the bytes, fields checked ------------------------------------


@pytest.fixture
def guarded_model():
    """A registered tiny model whose builder fails the test if it would allocate a huge head."""
    from featurescope.zoo import decorated

    def guarded(num_classes: int = 3) -> nn.Module:
        if num_classes > 1000 and torch.empty(0).device.type != "meta":
            raise AssertionError(f"allocated a {num_classes}-class head from the header")
        return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

    fs.zoo.register_model("guarded_probe")(guarded)
    try:
        yield "guarded_probe"
    finally:
        decorated.remove("guarded_probe")


def test_a_header_asking_for_millions_of_classes_is_refused_before_building(
    tmp_path, guarded_model
):
    model = fs.create_model(guarded_model, num_classes=3)
    path = fs.zoo.save_checkpoint(model, tmp_path / "forged.safetensors", num_classes=3_000_000)
    # A Linear(12, n) head: 12 n weights and n biases, against the 3-class file's 39 values.
    needed, present = 13 * 3_000_000, 13 * 3
    with pytest.raises(
        fs.errors.CheckpointError,
        match=rf"has {needed / 1e6:.1f} M values but .* only {present} values",
    ):
        fs.zoo.load_checkpoint(path)


def test_the_study_alexnet_with_a_forged_class_count_is_refused_at_once(tmp_path):
    model = fs.create_model("alexnet_half", num_classes=3)
    path = fs.zoo.save_checkpoint(model, tmp_path / "forged.safetensors", num_classes=3_000_000)
    with pytest.raises(fs.errors.CheckpointError, match="the file holds only"):
        fs.zoo.load_checkpoint(path)


def test_an_honest_checkpoint_still_loads_with_its_own_class_count(tmp_path, guarded_model):
    model = fs.create_model(guarded_model, num_classes=7)
    path = fs.zoo.save_checkpoint(model, tmp_path / "ok.safetensors")
    loaded = fs.zoo.load_checkpoint(path)
    _same_weights(model, loaded)
    assert fs.model_metadata(loaded).num_classes == 7


def _forged(tmp_path, **fields: str):
    from safetensors.torch import save_file

    header = {
        "format": checkpoints.FORMAT,
        "model": '"alexnet_half"',
        "num_classes": "3",
        "class_names": "null",
        "metadata": "{}",
        **fields,
    }
    path = tmp_path / "junk.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata=header)
    return path


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("num_classes", '"3"'),
        ("num_classes", "-4"),
        ("num_classes", "true"),
        ("num_classes", "2.5"),
        ("model", "5"),
        ("model", '["alexnet"]'),
        ("class_names", '{"a": 1}'),
        ("class_names", "[1, 2, 3]"),
        ("class_names", '["a", "b"]'),
        ("metadata", "[1, 2]"),
        ("metadata", '"text"'),
        ("metadata", "[" * 100_000 + "]" * 100_000),
        ("class_names", "[" * 100_000),
        ("num_classes", "{not json"),
    ],
)
def test_malformed_metadata_is_a_checkpoint_error_naming_the_field(tmp_path, field, text):
    path = _forged(tmp_path, **{field: text})
    for read in (fs.zoo.read_checkpoint_metadata, fs.zoo.load_checkpoint):
        with pytest.raises(fs.errors.CheckpointError, match=f"'{field}'"):
            read(path)
