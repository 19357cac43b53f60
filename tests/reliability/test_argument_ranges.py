"""Numbers out of range are refused with a message naming the argument: every numeric option of
the command line, and the Python arguments the training loop takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from featurescope.cli import main
from featurescope.errors import FeaturescopeError
from featurescope.train import train


@pytest.mark.parametrize(
    ("argv", "option", "wanted"),
    [
        (["train", "--batch-size", "0"], "--batch-size", "a positive whole number"),
        (["train", "--epochs", "-2"], "--epochs", "a positive whole number"),
        (["index", "build", "f", "--batch-size", "0"], "--batch-size", "a positive"),
        (["index", "search", "i", "q.png", "-k", "0"], "-k", "a positive whole number"),
        (["explore", "s", "-k", "0"], "-k", "a positive whole number"),
        (["explore", "s", "--queries", "-1"], "--queries", "a positive whole number"),
        (["compare", "a", "b", "f", "--batch-size", "3"], "--batch-size", "at least 4"),
        (["compare", "a", "b", "f", "--max-exact-features", "0"], "--max-exact-features", ""),
        (["maps", "m", "i.png", "--max-channels", "0"], "--max-channels", "a positive"),
        (["demo", "--seed", "-1"], "--seed", "at least 0"),
    ],
)
def test_cli_refuses_out_of_range_numbers(argv, option, wanted, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and wanted in err, err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be an int >= 1"),
        ("batch_size", 2.5, "batch_size must be an int >= 1"),
        ("num_workers", -1, "num_workers must be an int >= 0"),
        ("eval_batch_size", 0, "eval_batch_size must be an int >= 1"),
        ("seed", -5, "seed must be an int >= 0"),
        ("momentum", float("nan"), "momentum must be a finite number >= 0"),
        ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ],
)
def test_train_refuses_out_of_range_arguments(name, value, message):
    data = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(FeaturescopeError, match=message):
        train(nn.Linear(3, 2), data, epochs=1, progress=False, **{name: value})
