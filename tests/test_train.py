"""The training loop: learning, the lr schedule, determinism, checkpoints and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import featurescope as fs
from featurescope.data import load_image_folders, make_synthetic_dataset
from featurescope.train import STUDY_LR_SCHEDULE, History, kaiming_init_, lr_at, train
from featurescope.train.presets import PRESETS, QUICK, get_preset
from featurescope.zoo.checkpoints import load_weights


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(24, 3),
    )


def _tiny_data(n: int = 24, seed: int = 0) -> TensorDataset:
    """Random images whose class is which channel is brightest: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 8, 8, generator=g)
    images[torch.arange(n), labels] += 1.0
    return TensorDataset(images, labels)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _series(h: History) -> dict[str, list[float]]:
    d = h.to_dict()
    return {k: d[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")}


FAST = {"epochs": 3, "batch_size": 5, "lr_schedule": {1: 0.05, 3: 0.02}, "progress": False}


# --- the lr schedule -------------------------------------------------------------------------


def test_lr_at_follows_the_study_schedule() -> None:
    assert [lr_at(STUDY_LR_SCHEDULE, e) for e in range(1, 19)] == [0.01] * 18
    assert [lr_at(STUDY_LR_SCHEDULE, e) for e in (19, 20, 150)] == [0.003] * 3
    assert lr_at(0.5, 7) == 0.5
    with pytest.raises(fs.FeaturescopeError, match="epoch 1"):
        lr_at({2: 0.1}, 2)
    with pytest.raises(fs.FeaturescopeError, match="positive"):
        lr_at({1: -0.1}, 1)


def test_schedule_sets_the_optimizer_lr_per_epoch() -> None:
    """Plain SGD on one sample: each epoch is one step ``w -= lr(epoch) * grad``, in float64."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(1, 3), torch.tensor([1])
    w = model.weight.detach().double().clone().requires_grad_()
    b = model.bias.detach().double().clone().requires_grad_()
    reference = []
    for epoch in range(1, 21):
        loss = F.cross_entropy(x.double() @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, [w, b])
        lr = 0.01 if epoch <= 18 else 0.003
        w, b = (w - lr * gw).detach().requires_grad_(), (b - lr * gb).detach().requires_grad_()
        reference.append(w.detach().clone())

    seen: list[torch.Tensor] = []
    history = train(
        model,
        TensorDataset(x, y),
        epochs=20,
        batch_size=1,
        momentum=0.0,
        progress=False,
        on_epoch_end=lambda epoch, h: seen.append(model.weight.detach().double().clone()),
    )
    assert history.lr == [0.01] * 18 + [0.003] * 2
    for got, want in zip(seen, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- learning and determinism ----------------------------------------------------------------


def test_tiny_net_learns() -> None:
    data = _tiny_data()
    model = _tiny_net()
    history = train(model, data, data, optimizer="adam", **{**FAST, "lr_schedule": 0.05})
    assert history.epochs == 3
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] > 1 / 3
    assert not model.training  # left in eval mode


def test_alexnet_half_learns_real_images_and_checkpoints_them(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "d", train_per_class=1, val_per_class=0, test_per_class=0, size=32
    )
    data = load_image_folders(root).train
    torch.manual_seed(0)
    model = fs.create_model("alexnet_half", num_classes=5)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor(data.targets)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(images), labels))

    before = loss_now()
    history = train(
        model,
        data,
        epochs=2,
        batch_size=4,
        lr_schedule=1e-4,
        optimizer="adam",
        checkpoint_dir=tmp_path / "ck",
        progress=False,
    )
    assert history.epochs == 2
    assert history.val_loss == []
    assert loss_now() < before

    reloaded = fs.load_checkpoint(tmp_path / "ck" / "last.safetensors")
    assert fs.model_metadata(reloaded).architecture == "alexnet_half"
    assert list(fs.model_metadata(reloaded).class_names) == data.classes
    a, b = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    data = _tiny_data()
    runs = []
    for seed in (0, 0, 1):
        model = _tiny_net()
        history = train(model, data, data, seed=seed, **FAST)
        runs.append((_weights(model), _series(history)))
    (w0, h0), (w1, h1), (w2, _) = runs
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert h0 == h1
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)


# --- checkpoints and resuming ----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    data = _tiny_data()
    settings = {**FAST, "epochs": 4, "optimizer": optimizer}

    straight = _tiny_net()
    h_straight = train(straight, data, data, checkpoint_dir=tmp_path / "a", **settings)

    def stop_after_epoch_2(epoch: int, history: History) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            _tiny_net(),
            data,
            data,
            checkpoint_dir=tmp_path / "b",
            on_epoch_end=stop_after_epoch_2,
            **settings,
        )
    # Unfinished: the resume state is there, plain tensors that load without unpickling code.
    assert torch.load(tmp_path / "b" / "resume.pt", weights_only=True)["epoch"] == 2
    ran: list[int] = []
    resumed = _tiny_net(seed=99)  # other initial weights: they must come from the checkpoint
    h_resumed = train(
        resumed,
        data,
        data,
        checkpoint_dir=tmp_path / "b",
        on_epoch_end=lambda epoch, h: ran.append(epoch),
        **settings,
    )
    assert ran == [3, 4]
    assert not (tmp_path / "b" / "resume.pt").exists()  # finished: deleted
    assert _series(h_resumed) == _series(h_straight)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_hold_the_best_and_last_models(tmp_path: Path) -> None:
    data = _tiny_data()
    model = _tiny_net()
    history = train(
        model, data, data, checkpoint_dir=tmp_path, **{**FAST, "epochs": 5, "lr_schedule": 0.2}
    )
    last = fs.read_checkpoint_metadata(tmp_path / "last.safetensors")
    best = fs.read_checkpoint_metadata(tmp_path / "best.safetensors")
    assert last["epoch"] == 5
    assert best["epoch"] == history.best_epoch
    assert best["val_acc"] == history.best_val_acc
    assert history.info["best_checkpoint"] == str(tmp_path / "best.safetensors")

    # Reloaded weights reproduce the recorded accuracies.
    images, labels = data.tensors
    for name, epoch in (("last", 5), ("best", history.best_epoch)):
        reloaded = load_weights(_tiny_net(seed=5), tmp_path / f"{name}.safetensors").eval()
        with torch.no_grad():
            acc = (reloaded(images).argmax(1) == labels).float().mean().item()
        assert acc == pytest.approx(history.val_acc[epoch - 1])  # type: ignore[operator]

    assert History.load(tmp_path / "history.json") == history
    # A finished run leaves its two checkpoints, each the weights alone, and its history.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "history.json",
        "last.safetensors",
    ]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for name in ("best", "last"):
        assert (
            weight_bytes < (tmp_path / f"{name}.safetensors").stat().st_size < weight_bytes + 8192
        )


def test_finished_run_is_not_trained_again_and_extending_it_starts_over(tmp_path: Path) -> None:
    data = _tiny_data()
    trained = _tiny_net()
    first = train(trained, data, data, checkpoint_dir=tmp_path, **FAST)
    ran: list[int] = []
    reused = _tiny_net(seed=99)
    again = train(
        reused,
        data,
        data,
        checkpoint_dir=tmp_path,
        on_epoch_end=lambda e, h: ran.append(e),
        **FAST,
    )
    assert ran == []
    assert _series(again) == _series(first)
    a, b = _weights(trained), _weights(reused)  # the final weights, read from last.safetensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without the optimizer's state a finished run cannot continue exactly: it starts over.
    longer = train(
        _tiny_net(),
        data,
        data,
        checkpoint_dir=tmp_path,
        on_epoch_end=lambda e, h: ran.append(e),
        **{**FAST, "epochs": 4},
    )
    assert ran == [1, 2, 3, 4]
    assert longer.epochs == 4
    assert _series(longer)["train_loss"][:3] == _series(first)["train_loss"]


@pytest.mark.parametrize("best_is_last", [True, False])
def test_a_finished_run_with_only_its_best_weights_is_reused_when_they_are_final(
    tmp_path: Path, best_is_last: bool
) -> None:
    """What ``featurescope demo`` leaves: history.json and best.safetensors alone."""
    data = _tiny_data()
    settings = {**FAST, "lr_schedule": 0.05}
    trained = _tiny_net()
    first = train(trained, data, data, checkpoint_dir=tmp_path, **settings)
    (tmp_path / "last.safetensors").unlink()
    if best_is_last != (first.best_epoch == first.epochs):
        # Make the kept best.safetensors hold the final epoch, or an earlier one.
        epoch = first.epochs if best_is_last else first.epochs - 1
        fs.save_checkpoint(trained, tmp_path / "best.safetensors", epoch=epoch)
    ran: list[int] = []
    # Reused, the weights come from the file; retrained, from the same start as the first run.
    reused = _tiny_net(seed=99 if best_is_last else 0)
    train(
        reused,
        data,
        data,
        checkpoint_dir=tmp_path,
        on_epoch_end=lambda e, h: ran.append(e),
        **settings,
    )
    assert ran == ([] if best_is_last else [1, 2, 3])
    a, b = _weights(trained), _weights(reused)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_refuse_to_resume_unless_told(tmp_path: Path) -> None:
    data = _tiny_data()
    train(_tiny_net(), data, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(fs.CheckpointError, match="batch_size: 5 there, 4 now"):
        train(_tiny_net(), data, checkpoint_dir=tmp_path, **{**FAST, "batch_size": 4})
    ran: list[int] = []
    train(
        _tiny_net(),
        data,
        checkpoint_dir=tmp_path,
        resume=False,
        on_epoch_end=lambda e, h: ran.append(e),
        **{**FAST, "batch_size": 4},
    )
    assert ran == [1, 2, 3]


# --- history and errors ----------------------------------------------------------------------


def test_history_is_json_and_feeds_a_curves_plot() -> None:
    data = _tiny_data()
    history = train(_tiny_net(), data, data, **FAST)
    d = json.loads(json.dumps(history.to_dict()))
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= d.keys()
    assert all(len(d[k]) == 3 for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"))
    assert History.from_dict(d) == history
    fig = fs.visualize("curves", {"r": history})
    loss_ax, acc_ax = fig.axes
    labels = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    assert labels == {"r train_loss": history.train_loss, "r val_loss": history.val_loss}
    acc_labels = {line.get_label() for line in acc_ax.get_lines()}
    assert acc_labels == {"r train_acc", "r val_acc"}


def test_empty_val_data_is_rejected() -> None:
    data = _tiny_data()
    with pytest.raises(fs.FeaturescopeError, match="val_data is empty"):
        train(_tiny_net(), data, TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), **FAST)


def test_bad_arguments_are_clear_errors() -> None:
    data = _tiny_data()
    with pytest.raises(fs.UnknownNameError, match="adamw"):
        train(_tiny_net(), data, optimizer="adamx", **FAST)
    with pytest.raises(fs.FeaturescopeError, match="epoch 1"):
        train(_tiny_net(), data, **{**FAST, "lr_schedule": {5: 0.1}})
    with pytest.raises(fs.FeaturescopeError, match="epochs"):
        train(_tiny_net(), data, **{**FAST, "epochs": 0})


def test_diverging_loss_stops_with_advice() -> None:
    model = _tiny_net()
    with torch.no_grad():
        model[-1].weight.fill_(float("nan"))
    with pytest.raises(fs.FeaturescopeError, match="learning rate"):
        train(model, _tiny_data(), **FAST)


def test_progress_bar_and_custom_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    data = _tiny_data()

    def sgd(params):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(params, lr=123.0)  # the schedule's lr replaces this one

    history = train(_tiny_net(), data, optimizer=sgd, **{**FAST, "progress": True})
    assert history.lr == [0.05, 0.05, 0.02]
    assert "epoch 3/3" in capsys.readouterr().err


# --- initialisation and presets --------------------------------------------------------------


def test_kaiming_init_matches_he_et_al() -> None:
    model = fs.create_model("alexnet_half", num_classes=5)
    kaiming_init_(model)
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        assert float(layer.bias.detach().abs().max()) == 0.0
        fan_in = layer.weight[0].numel()
        want = 0.01 if name == "fc.5" else (2.0 / fan_in) ** 0.5
        assert float(layer.weight.detach().std()) == pytest.approx(want, rel=0.1), name


def test_presets() -> None:
    study = get_preset("study")
    assert study.epochs == 150
    assert study.batch_sizes == (8, 16)
    assert study.optimizer == "sgd"
    assert study.momentum == 0.9
    assert dict(study.lr_schedule) == {1: 0.01, 19: 0.003}
    assert study.init is None
    assert set(PRESETS) == {"quick", "study"}
    with pytest.raises(fs.UnknownNameError, match="quick"):
        get_preset("quik")
    assert json.loads(json.dumps(QUICK.to_dict()))["name"] == "quick"

    torch.manual_seed(0)
    plain = fs.create_model("alexnet_half")
    built = QUICK.build_model("alexnet_half", seed=0)
    assert float(built.fc[0].bias.detach().abs().sum()) == 0.0  # re-initialised
    assert not torch.equal(plain.fc[0].weight, built.fc[0].weight)
    assert torch.equal(QUICK.build_model("alexnet_half", seed=0).fc[0].weight, built.fc[0].weight)

    data = _tiny_data()
    kwargs = {**QUICK.train_kwargs(), "epochs": 1, "progress": False}
    history = train(_tiny_net(), data, data, **kwargs)
    assert history.info["optimizer"] == QUICK.optimizer
    assert history.info["batch_size"] == QUICK.batch_sizes[0]
