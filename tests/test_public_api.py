"""The public API: a small root, every other name in its sub-package, and the moves said plainly.

Also the rules that the root's move made single: one spec type per registered model, where
pretrained weights come from, and a montage's hits.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import featurescope as fs
from featurescope.zoo import ModelSpec, model_name, model_spec

DOCS = Path(__file__).resolve().parents[1] / "docs"
_SECTION = re.compile(r"^\.\. currentmodule:: ([\w.]+)\s*$", re.MULTILINE)
_LISTED = re.compile(r"^ {3,}([\w.]+)\s*$", re.MULTILINE)


def api_sections(rst: str) -> dict[str, list[str]]:
    """``{module: [names listed in its autosummaries]}`` of an API page, in page order."""
    parts = _SECTION.split(rst)
    sections: dict[str, list[str]] = {}
    for module, body in zip(parts[1::2], parts[2::2], strict=True):
        sections.setdefault(module, []).extend(_LISTED.findall(body))
    return sections


def _resolve(dotted: str) -> object:
    module, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError:
        return getattr(_resolve(module), attribute)


def test_the_api_page_parser_can_fail():
    page = ".. currentmodule:: a\n\n   x\n   y\n\n.. currentmodule:: a.b\n\n   z\n"
    assert api_sections(page) == {"a": ["x", "y"], "a.b": ["z"]}


def test_the_root_is_small_and_its_section_of_the_api_page_lists_exactly_it():
    sections = api_sections((DOCS / "api.rst").read_text(encoding="utf-8"))
    assert 15 <= len(fs.__all__) <= 22
    assert sorted(sections["featurescope"]) == sorted(fs.__all__)


def test_every_name_on_the_api_page_is_where_the_page_says():
    sections = api_sections((DOCS / "api.rst").read_text(encoding="utf-8"))
    for module, names in sections.items():
        for name in names:
            assert _resolve(f"{module}.{name}") is not None, f"{module}.{name}"
    listed = [f"{m}.{n}" for m, names in sections.items() for n in names]
    assert len(listed) == len(set(listed)), "a name is listed twice"


@pytest.mark.parametrize("old", sorted(fs._MOVED))
def test_a_moved_name_says_where_it_went(old):
    new = fs._MOVED[old]
    with pytest.raises(AttributeError, match=re.escape(new)):
        getattr(fs, old)
    assert old not in fs.__all__ and old not in dir(fs)
    assert _resolve(new) is not None  # the new place exists


def test_the_root_keeps_nothing_twice():
    # No aliases at the root or in the visualizers: each object has one public name.
    from featurescope import visualizers

    names = [n for n in visualizers.__all__ if callable(getattr(visualizers, n))]
    objects = [getattr(visualizers, n) for n in names]
    assert len({id(o) for o in objects}) == len(objects)
    assert not hasattr(visualizers, "save_figure")


def test_the_root_imports_no_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, featurescope; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "False"


def test_train_is_the_subpackage_and_its_function_is_inside():
    import featurescope.train

    assert fs.train is featurescope.train
    assert callable(fs.train.train) and fs.train.train.__module__ == "featurescope.train._loop"


# --- the visualizers as functions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "function"),
    [("grid", "grid"), ("sum", "channel_sum"), ("overlay", "overlay"), ("montage", "montage")],
)
def test_a_builtin_visualizer_is_a_plain_function_of_the_package(name, function):
    from featurescope import visualizers

    assert visualizers.get_visualizer(name) is getattr(visualizers, function)
    module = sys.modules[f"featurescope.visualizers.{name}"]
    assert getattr(module, function) is getattr(visualizers, function)


def test_a_visualizer_called_directly_draws_what_visualize_draws():
    from featurescope import visualizers

    maps = torch.rand(6, 5, 5, generator=torch.Generator().manual_seed(0))
    direct = visualizers.grid(maps, max_channels=4, order="l2")
    by_name = fs.visualize("grid", maps, max_channels=4, order="l2")
    pixels = [[ax.images[0].get_array() for ax in fig.axes] for fig in (direct, by_name)]
    assert len(pixels[0]) == 4
    for a, b in zip(*pixels, strict=True):
        np.testing.assert_array_equal(a, b)


# --- a montage's hits ----------------------------------------------------------------------


def _caption_colours(fig, k):
    return [ax.title.get_color() for ax in fig.axes[1 : 1 + k]]


def test_montage_hits_compare_labels_not_their_captions():
    from featurescope.visualizers import montage

    images = torch.rand(4, 3, 6, 6)
    result = (torch.tensor([[0.0, 0.1, 0.2]]), torch.tensor([[1, 2, 3]]))
    # Classes 0 and 1 share a caption; only image 2 has the query's class.
    fig = montage(
        result, images=images, queries=[0], labels=[0, 1, 0, -1], class_names=["cat", "cat"]
    )
    assert _caption_colours(fig, 3) == ["tab:red", "tab:green", "black"]


def test_montage_takes_the_hits_it_is_given():
    from featurescope.errors import InputShapeError
    from featurescope.visualizers import montage

    images = torch.rand(4, 3, 6, 6)
    result = (torch.tensor([[0.0, 0.1, 0.2]]), torch.tensor([[1, 2, 3]]))
    fig = montage(result, images=images, queries=[0], hits=[[True, False, True]])
    assert _caption_colours(fig, 3) == ["tab:green", "tab:red", "tab:green"]
    with pytest.raises(InputShapeError, match=r"hits must be \[nq, k\]"):
        montage(result, images=images, hits=[[True, False]])


# --- one spec per registered model; where pretrained weights come from ---------------------


def test_the_registry_gives_the_plugins_spec_with_its_name_and_plugin():
    spec = model_spec("alexnet_half")
    assert isinstance(spec, ModelSpec)
    assert (spec.name, spec.plugin) == ("alexnet_half", "featurescope.zoo.alexnet")
    assert spec.stages == ("conv1", "conv2", "conv3", "fc")


def test_pretrained_weights_are_tagged_with_the_source_the_spec_declares(monkeypatch):
    from featurescope import plugins, zoo

    def builder(num_classes=5, weights=None):
        return nn.Linear(2, num_classes)

    declared = ModelSpec(builder, weights="V1", weights_source="somewhere")
    undeclared = ModelSpec(builder, weights="V1")
    plugin = type(
        "Plugin",
        (),
        {
            "featurescope_register_models": staticmethod(
                fs.hookimpl(lambda: {"declared_net": declared, "undeclared_net": undeclared})
            )
        },
    )
    plugins.register_plugin(plugin, name="acme_models")
    try:
        assert fs.model_metadata(zoo.create_model("declared_net", pretrained=True)).weights == (
            "somewhere:V1"
        )
        # Without a declaration the plugin's own name says it, never a guess from it.
        assert fs.model_metadata(zoo.create_model("undeclared_net", pretrained="V2")).weights == (
            "acme_models:V2"
        )
    finally:
        plugins.unregister_plugin("acme_models")


def test_torchvision_weights_declare_torchvision():
    assert model_spec("resnet18").weights_source == "torchvision"
    assert model_spec("tv_alexnet").weights_source == "torchvision"
    assert model_spec("alexnet").weights is None


def test_model_name_is_the_zoo_name_else_the_class_name():
    assert model_name(fs.create_model("alexnet_half")) == "alexnet_half"
    assert model_name(fs.FeatureTap(fs.create_model("alexnet_half"), ["fc.4"])) == "alexnet_half"
    assert model_name(nn.Sequential()) == "Sequential"
