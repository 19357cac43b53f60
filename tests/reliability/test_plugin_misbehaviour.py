"""Misbehaving plugins: whatever a plugin does wrong (raise, sys.exit, return junk) is an error
naming it, never a silent exit or a raw traceback, and unregistering it restores the builtins."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

import featurescope as fs
from _plugin_module import plugin_module
from featurescope.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_plugins")]


def _exit(code: Any) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        sys.exit(code)

    return call


def _raise(exc: BaseException) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return call


HOOK_MISBEHAVIOURS = {
    "exit 0": (_exit(0), r"called sys.exit\(0\)"),
    "exit message": (_exit("bye"), r"called sys.exit\('bye'\)"),
    "raises": (_raise(ValueError("bad config")), "raised ValueError .*bad config"),
    "returns None": (lambda: None, "returned None"),
    "returns a list": (lambda: ["toy"], "must return a dict"),
    "bad name": (lambda: {"": torch.nn.Identity}, "names must be non-empty strings"),
}

BUILDER_MISBEHAVIOURS = {
    "exit 0": (_exit(0), r"called sys.exit\(0\)"),
    "raises": (_raise(RuntimeError("no kernel")), "raised RuntimeError .*no kernel"),
    "returns junk": (lambda num_classes=5: "a string", "not a torch.nn.Module"),
}


def _plugin(**hooks: Callable[..., Any]) -> types.ModuleType:
    return plugin_module(**hooks)


@pytest.mark.parametrize("case", sorted(HOOK_MISBEHAVIOURS))
def test_a_misbehaving_registry_hook_is_an_error_naming_it(case: str, capsys) -> None:
    hook, expected = HOOK_MISBEHAVIOURS[case]
    fs.register_plugin(_plugin(featurescope_register_models=hook), "rogue")
    with pytest.raises(fs.PluginError, match=expected) as caught:
        fs.list_models()
    assert "rogue" in str(caught.value)
    assert main(["models", "alexnet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurescope models: error: ") and err.count("\n") == 1
    fs.unregister_plugin("rogue")
    assert fs.list_models("alexnet*") == ["alexnet", "alexnet_half"]  # nothing lost


@pytest.mark.parametrize("case", sorted(BUILDER_MISBEHAVIOURS))
def test_a_misbehaving_builder_is_an_error_naming_its_plugin(case: str) -> None:
    builder, expected = BUILDER_MISBEHAVIOURS[case]
    fs.register_plugin(
        _plugin(featurescope_register_models=lambda: {"rogue_net": builder}), "rogue"
    )
    with pytest.raises(fs.PluginError, match=rf"'rogue'.*{expected}"):
        fs.create_model("rogue_net")
    assert sum(p.numel() for p in fs.create_model("alexnet_half").parameters()) > 0


def test_overriding_every_builtin_model_warns_once_per_name() -> None:
    builtins = fs.list_models("alexnet*")
    fs.register_plugin(
        _plugin(featurescope_register_models=lambda: dict.fromkeys(builtins, torch.nn.Identity)),
        "impostor",
    )
    with pytest.warns(fs.errors.PluginOverrideWarning) as record:
        fs.list_models()
    assert sorted(str(w.message).split("'")[3] for w in record) == builtins
    fs.list_models()  # once: a second warning would be an error in this suite
