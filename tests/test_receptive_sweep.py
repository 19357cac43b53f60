"""Receptive fields proven on every torchvision classification model (gated like the tap sweep).

For each model (random weights, eval mode, a small input), every node whose field is defined
is checked at its corners and middle against the support of the gradient (see
``tests/_receptive_truth.py``). Nodes the analysis cannot follow (an op it does not know)
fail the model with the op's name.

The float64 gradients cost far more than the tap sweep's forward passes (densenet121 alone
takes minutes on two cores), so the sweep runs only when ``FEATURESCOPE_FULL_SWEEPS=1``
(``tests/_sweep.py``), then as the other sweeps do: a subset on every torch, the other models
(``slow``) on the newest. ``tests/test_receptive.py`` keeps a cheap check of resnet18 in every
run.
"""

from __future__ import annotations

import warnings

import pytest
import torchvision

import _sweep as sweep
from _receptive_truth import support_boxes
from featurescope.tap import receptive_fields

SUBSET = ("resnet18", "squeezenet1_1")
_INPUT = {
    "alexnet": 63,
    "googlenet": 32,
    "inception_v3": 75,
    "maxvit_t": 224,
    "swin_t": 64,
    "swin_v2_t": 64,
}


def _side(name: str) -> int:
    if name.startswith("vit_"):
        return int(name.rsplit("_", 1)[1])
    return _INPUT.get(name, 32)


def _models() -> list[pytest.param]:
    if not sweep.full_sweeps():
        skip = pytest.mark.skip(reason=f"set {sweep.FULL_SWEEPS_VARIABLE}=1 to sweep")
        return [pytest.param(n, marks=(pytest.mark.slow, skip)) for n in SUBSET]
    return sweep.params(sweep.torchvision_classifiers(), SUBSET)


@pytest.mark.timeout(1800)  # float64 gradients: minutes per model on two cores
@pytest.mark.parametrize("name", _models())
def test_every_node_matches_the_gradient(name: str) -> None:
    side = _side(name)
    kwargs = {"image_size": side} if name.startswith("vit_") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    fields = receptive_fields(model, None, (side, side))
    queries = []
    for node, rf in fields.items():
        if rf.is_global:
            queries.append((node, -1, -1, None))
        else:
            assert rf.output_size is not None
            h, w = rf.output_size
            spots = {(0, 0), (h - 1, w - 1), (h // 2, w // 3)}
            queries += [(node, i, j, rf.dims) for i, j in sorted(spots)]
    truth = support_boxes(model, (side, side), queries)
    wrong = []
    for (node, i, j, _), box in zip(queries, truth, strict=True):
        rf = fields[node]
        expected = (0, 0, side, side) if rf.is_global else rf.box(i, j)
        if box != expected:
            wrong.append((node, (i, j), expected, box))
    assert not wrong, f"{name}: {len(wrong)} wrong boxes, e.g. {wrong[:4]}"
