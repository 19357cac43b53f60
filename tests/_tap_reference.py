"""Independent references for the FeatureTap sweep over torchvision's classification models.

* :func:`module_calls`: an eager forward with a forward hook on every module that clones the
  output at the moment the module returns it (so no later in-place op can change it). A module
  called more than once is ``name`` for its first call, ``name_1`` for its second, ...
* :func:`node_snapshots`: the traced graph re-executed node by node by ``torch.fx.Interpreter``
  with a clone of every node's output taken right after the node ran; later nodes get the
  original values, so the model computes exactly what it computes eagerly.
* :func:`compare_torchvision`: where torchvision's ``create_feature_extractor`` returns something
  other than what a name means, and why: ``"misnamed"`` (its name is another node's name) or
  ``"overwritten"`` (the right node, overwritten in place later).

Run as a script, it turns the JSON rows a sweep wrote (``FEATURESCOPE_SWEEP_REPORT=dir``) into
the reStructuredText table of ``docs/tap_models.rst``::

    FEATURESCOPE_FULL_SWEEPS=1 FEATURESCOPE_SWEEP_REPORT=/tmp/sweep pytest tests/test_tap_sweep.py -n 2
    python tests/_tap_reference.py /tmp/sweep
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn


def clone(value: Any) -> Any:
    """A deep copy of the tensors in a (nested) output, each container of its own type."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        copied = [clone(v) for v in value]
        if hasattr(value, "_fields"):  # a named tuple
            return type(value)(*copied)
        return tuple(copied) if type(value) is tuple else type(value)(copied)  # return_types
    if isinstance(value, list):
        return [clone(v) for v in value]
    if isinstance(value, dict):
        items = {k: clone(v) for k, v in value.items()}
        try:
            return type(value)(items)  # OrderedDict and friends keep their type
        except TypeError:
            return items
    return value


def same(actual: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Equality of two (nested) outputs, bit for bit by default (NaNs equal each other).

    Containers must be of the same type: a named tuple, ``torch.return_types`` value or
    ``OrderedDict`` that comes back as a plain tuple or dict is wrong.

    ``rtol``/``atol`` admit rounding, for a computation that takes another kernel path (under a
    ``TorchFunctionMode`` ``nn.MultiheadAttention`` leaves its fused fast path).
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            return False
        if actual.dtype != expected.dtype:
            return False
        if torch.equal(actual, expected):
            return True
        if not expected.is_floating_point():
            return False
        return bool(torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True).all())
    if isinstance(expected, (tuple, list)):
        return (
            type(actual) is type(expected)  # a named tuple or torch.return_types stays one
            and len(actual) == len(expected)
            and all(same(a, e, rtol, atol) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(expected, dict):
        return (
            type(actual) is type(expected)
            and actual.keys() == expected.keys()
            and all(same(actual[k], expected[k], rtol, atol) for k in expected)
        )
    return bool(actual == expected)


def module_calls(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``{module path (name_k for its k+1-th call): output cloned when returned}``, eager."""
    calls: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            calls[name if k == 0 else f"{name}_{k}"] = clone(output)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


class _CloningInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.snapshots: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.snapshots[n] = clone(result)
        return result


def node_snapshots(
    module: fx.GraphModule, qualnames: Mapping[fx.Node, str], x: Any
) -> dict[str, Any]:
    """``{node name: its output cloned right after it ran}`` for every named node of a graph."""
    interpreter = _CloningInterpreter(module)
    interpreter.run(x)
    return {qualnames[n]: v for n, v in interpreter.snapshots.items() if n in qualnames}


def expected_value(
    name: str, node: fx.Node, calls: Mapping[str, Any], snapshots: Mapping[str, Any]
) -> Any:
    """What node ``name`` means: a leaf module's call as eager ran it, else the node's output."""
    if node.op == "call_module":
        return calls[name]
    return snapshots[name]


def compare_torchvision(
    tv_names: list[str],
    our_names: list[str],
    tv_outputs: Mapping[str, Any],
    our_nodes: Mapping[str, fx.Node],
    calls: Mapping[str, Any],
    snapshots: Mapping[str, Any],
) -> dict[str, list[str]]:
    """Sort torchvision's node names by what its extractor returns for them.

    ``tv_names[i]`` and ``our_names[i]`` name the same graph node (both traces record nodes in
    execution order). A torchvision name is ``"right"`` when its output is what that name means
    (:func:`expected_value` of the node of that name); ``"misnamed"`` when the name is another
    node's; ``"overwritten"`` when it is the right node but an in-place op changed it later;
    ``"phantom"`` when the name means no node (e.g. ViT's ``ln``: there is no module ``ln``).
    """
    result: dict[str, list[str]] = {"right": [], "misnamed": [], "overwritten": [], "phantom": []}
    for tv_name, our_name in zip(tv_names, our_names, strict=True):
        if tv_name not in our_nodes:
            result["phantom"].append(tv_name)
            continue
        expected = expected_value(tv_name, our_nodes[tv_name], calls, snapshots)
        if same(tv_outputs[tv_name], expected):
            result["right"].append(tv_name)
        elif tv_name != our_name:
            result["misnamed"].append(tv_name)
        else:
            result["overwritten"].append(tv_name)
    return result


def _table(folder: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    header = (
        "model",
        "input",
        "eval nodes",
        "modules (hooks)",
        "kept from in-place writes",
        "torchvision wrong",
        "why (torchvision)",
    )
    body = []
    for r in rows:
        why = []
        if r["tv_misnamed"]:
            why.append(f"{r['tv_misnamed']} misnamed")
        if r["tv_overwritten"]:
            why.append(f"{r['tv_overwritten']} overwritten in place")
        body.append(
            (
                f"``{r['model']}``",
                str(r["input"]),
                str(r["nodes"]),
                str(r["modules"]),
                str(r["copied"]),
                str(r["tv_misnamed"] + r["tv_overwritten"]),
                ", ".join(why) or "",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([rule, line(header), rule, *(line(row) for row in body), rule])


if __name__ == "__main__":
    print(_table(Path(sys.argv[1])))
