"""FeatureTap: any layer's outputs, right even under in-place ops, at the cost of a plain forward.

``FeatureTap(model, return_nodes)`` takes ``return_nodes`` exactly as torchvision's
``create_feature_extractor`` does, so the study's snippet changes by one line::

    # extractor = create_feature_extractor(model, return_nodes=nodes)
    extractor = FeatureTap(model, return_nodes=nodes)
    features = extractor(images)          # {"output1": ..., "output4": ...}

A tap is an ``nn.Module`` whose one submodule is the model itself, so it nests in a larger model
as a trainable backbone, moves with it, compiles and (fx) exports. ``train_return_nodes`` and
``eval_return_nodes`` name separate nodes per mode, as torchvision takes them.

Two backends, picked once and run through one interface (``_program.Program``): ``"fx"`` (a
torch.fx graph, node names as torchvision's, pruned after the deepest requested node) and
``"hooks"`` (forward hooks on modules, for models torch.fx cannot trace).
``"auto"`` tries fx and falls back to hooks with one warning. Both return each node's true output:
where a later op writes into the same storage in place (the study's ``ReLU(inplace=True)``), that
node alone is copied first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from featurescope._torch_utils import model_device, model_dtype, training_mode
from featurescope.errors import (
    FeaturescopeError,
    FeaturescopeWarning,
    InputShapeError,
    NodeNotFoundError,
)
from featurescope.tap._fx import build_program, node_not_found
from featurescope.tap._hooks import HookProgram
from featurescope.tap._program import Program
from featurescope.tap._store import Extraction
from featurescope.tap._trace import Trace, trace

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from featurescope.tap._extract import Reduce

__all__ = ["FeatureTap", "NodeSummary", "get_graph_node_names"]

Backend = Literal["auto", "fx", "hooks"]
_BACKENDS = ("auto", "fx", "hooks")


def get_graph_node_names(
    model: nn.Module,
    tracer_kwargs: Mapping[str, Any] | None = None,
    suppress_diff_warning: bool = False,
    concrete_args: dict[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """The node names :class:`FeatureTap` accepts, in execution order: ``(train, eval)``.

    The same lists as torchvision's ``get_graph_node_names`` (the model is traced in training
    and in eval mode), but every submodule's own training flag is restored afterwards.

    Args:
        model: the model to trace.
        tracer_kwargs: passed to torchvision's ``NodePathTracer`` (e.g. ``leaf_modules``).
        suppress_diff_warning: accepted for torchvision compatibility; the two lists are
            returned as they are, without a warning when they differ.
        concrete_args: passed to ``torch.fx.Tracer.trace``.

    Returns:
        ``(train_nodes, eval_nodes)``. A prefix of a name up to a dot (``"conv1"`` for
        ``"conv1.2"``) is also accepted by :class:`FeatureTap`, meaning the last node under it.

    Raises:
        FeaturescopeError: torch.fx cannot trace the model; the message gives the reason. Such a
            model can still be tapped by module name with ``backend="hooks"``.

    Example:
        >>> import featurescope as fs
        >>> train_nodes, eval_nodes = fs.get_graph_node_names(fs.create_model("alexnet"))
        >>> eval_nodes[:4]
        ['x', 'check_input_size', 'conv1.0', 'conv1.1']
    """
    del suppress_diff_warning
    try:
        traces = [trace(model, mode, tracer_kwargs, concrete_args) for mode in (True, False)]
    except Exception as exc:
        raise FeaturescopeError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "FeatureTap(model, nodes, backend='hooks') taps it by module name instead "
            "([n for n, _ in model.named_modules()])."
        ) from exc
    return traces[0].names, traces[1].names


@dataclass(frozen=True)
class NodeSummary:
    """One row of :meth:`FeatureTap.summary`.

    Attributes:
        alias: the key the node has in the tap's output.
        node: the node's name in the graph (or the module's name for the hooks backend).
        op: what it computes: a module class (``"Conv2d"``), a function or ``Tensor.method``.
        output_shape: the output's shape with ``-1`` for the batch, as torchsummary prints it.
        params: parameters of the module named by the request (``"conv1"`` counts the whole
            stage); 0 for functions.
    """

    alias: str
    node: str
    op: str
    output_shape: tuple[int, ...]
    params: int


class FeatureTap(nn.Module):
    """Returns the outputs of any nodes of a model: ``tap(x) -> {alias: tensor}``.

    A tap is an ``nn.Module`` whose one submodule, ``tap.model``, is the tapped model itself,
    never a copy: it shares the model's weights, device, dtype and ``train()``/``eval()`` mode.
    So it nests in a larger model as a trainable backbone (gradients flow into the model's
    weights), moves with ``tap.to(...)``, lists the model's parameters and, for the fx backend,
    compiles (``torch.compile``) and exports (``torch.export``). Its ``state_dict()`` is the
    model's under the prefix ``model.``.

    Args:
        model: the model to tap. It is not copied: the tap follows its weights, its device and
            its ``train()``/``eval()`` mode (dropout is active only in training).
        return_nodes: a list of node names, or a dict ``{node name: alias}``, exactly as
            ``torchvision.models.feature_extraction.create_feature_extractor`` takes them. A name
            may be a module that torch.fx traced through (``"conv1"``), meaning its last node.
            See :func:`get_graph_node_names`.
        train_return_nodes: instead of ``return_nodes``, the nodes to return while the model is
            in training mode, for a model whose graph differs between the modes (it branches
            on ``self.training``); needs ``eval_return_nodes`` too, as in torchvision.
        eval_return_nodes: the nodes to return in eval mode, with ``train_return_nodes``.
        backend: ``"fx"``, ``"hooks"`` (module names only), or ``"auto"``: fx, falling back to
            hooks with one :class:`~featurescope.FeaturescopeWarning` if the model cannot be
            traced.
        tracer_kwargs: for the fx backend, passed to torchvision's ``NodePathTracer``
            (``leaf_modules``, ``autowrap_functions``, ...).
        suppress_diff_warning: accepted for torchvision compatibility; the tap never warns
            that the training and eval graphs differ.
        concrete_args: for the fx backend, passed to ``torch.fx.Tracer.trace``.

    Raises:
        NodeNotFoundError: a node name is unknown (the message lists the closest ones), or is
            in only one mode's graph.
        FeaturescopeError: no nodes are given; ``return_nodes`` is given together with
            ``train_return_nodes``/``eval_return_nodes``, or only one of those two; a set of
            nodes is empty, asks for one node twice or uses one alias twice; ``backend`` is
            unknown; or fx was asked for and cannot trace the model.

    Example:
        >>> import torch, featurescope as fs
        >>> model = fs.create_model("alexnet").eval()
        >>> tap = fs.FeatureTap(model, {"conv1": "output1", "conv2": "output2",
        ...                             "conv3": "output3", "fc": "output4"})
        >>> out = tap(torch.randn(2, 3, 227, 227))
        >>> {k: tuple(v.shape) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'output1': (2, 96, 27, 27), 'output2': (2, 256, 13, 13),
         'output3': (2, 256, 6, 6), 'output4': (2, 5)}
        >>> pre = fs.FeatureTap(model, ["conv1.0", "conv1.1"])(torch.randn(1, 3, 227, 227))
        >>> bool((pre["conv1.0"] < 0).any()), bool((pre["conv1.1"] < 0).any())  # before/after ReLU
        (True, False)
        >>> isinstance(tap, torch.nn.Module), tap.model is model
        (True, True)
        >>> heads = torch.nn.ModuleDict({"backbone": tap, "head": torch.nn.Linear(5, 2)})
        >>> heads["head"](heads["backbone"](torch.randn(1, 3, 227, 227))["output4"]).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        return_nodes: Sequence[str] | Mapping[str, str] | None = None,
        *,
        train_return_nodes: Sequence[str] | Mapping[str, str] | None = None,
        eval_return_nodes: Sequence[str] | Mapping[str, str] | None = None,
        backend: Backend = "auto",
        tracer_kwargs: Mapping[str, Any] | None = None,
        suppress_diff_warning: bool = False,
        concrete_args: dict[str, Any] | None = None,
    ) -> None:
        del suppress_diff_warning
        if not isinstance(model, nn.Module):
            raise FeaturescopeError(
                f"FeatureTap needs a torch.nn.Module, got {type(model).__name__}"
            )
        if backend not in _BACKENDS:
            raise FeaturescopeError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        node_sets = _node_sets(return_nodes, train_return_nodes, eval_return_nodes)
        backend_in_use, reason, programs = _build_programs(
            model, node_sets, backend, tracer_kwargs, concrete_args
        )
        super().__init__()
        self.model = model
        # A new module starts in training mode; the tap starts in the model's.
        self.training = model.training
        #: The backend in use, ``"fx"`` or ``"hooks"``.
        self.backend: str = backend_in_use
        #: Why fx was not used, when ``backend="auto"`` fell back to hooks.
        self.fallback_reason: str | None = reason
        #: ``{node: alias}`` returned in training mode.
        self.train_return_nodes: dict[str, str] = node_sets[True]
        #: ``{node: alias}`` returned in eval mode.
        self.eval_return_nodes: dict[str, str] = node_sets[False]
        # Not nn.Modules, so the GraphModules' references to the model's submodules do not
        # show up a second time in parameters(), state_dict() or .to().
        self._programs: dict[bool, Program] = programs

    @property
    def _program(self) -> Program:
        return self._programs[self.model.training]

    @property
    def return_nodes(self) -> dict[str, str]:
        """``{node: alias}`` returned in the model's current mode."""
        return self.train_return_nodes if self.model.training else self.eval_return_nodes

    @property
    def aliases(self) -> list[str]:
        """The keys of the tap's output, in the order of ``return_nodes``."""
        return list(self.return_nodes.values())

    @property
    def nodes(self) -> dict[str, str]:
        """``{alias: node}``: the graph node (or module) each alias resolved to, in the current mode."""
        return dict(self._program.nodes)

    @property
    def copied(self) -> list[str]:
        """Aliases the fx backend copies because a later in-place op overwrites them."""
        return list(self._program.copied)

    def extra_repr(self) -> str:
        """The request and the backend, printed by ``repr`` above the model."""
        if self.train_return_nodes is self.eval_return_nodes:
            nodes = f"return_nodes={self.return_nodes!r}"
        else:
            nodes = (
                f"train_return_nodes={self.train_return_nodes!r}, "
                f"eval_return_nodes={self.eval_return_nodes!r}"
            )
        return f"{nodes}, backend={self.backend!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript is not supported; ``torch.jit.script(tap)`` raises this clear error."""
        raise FeaturescopeError(
            "FeatureTap does not support TorchScript (torch.jit.script), which PyTorch keeps in "
            "maintenance mode: use torch.compile(tap), or torch.export.export(tap, (x,)) with "
            "backend='fx'. For a scripted extractor use torchvision's "
            "create_feature_extractor(model, return_nodes), which takes the same node names."
        )

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the model on ``args`` and return ``{alias: output}`` of the requested nodes.

        Raises:
            InputShapeError: the input does not fit the model.
            FeaturescopeError: the input is on another device than the model, or is a floating
                tensor of another dtype than the model's parameters (outside autocast); or
                ``torch.export`` traces a tap of the hooks backend.
        """
        program = self._program
        if _is_exporting():
            if program.export_blocker is not None:
                raise FeaturescopeError(
                    f"torch.export cannot capture this FeatureTap of {type(self.model).__name__}: "
                    f"{program.export_blocker}. Export a tap built with backend='fx' (module or "
                    "graph node names); torch.compile(tap) does run a hooks tap."
                )
            return program(self.model, *args, **kwargs)
        if torch.compiler.is_compiling():
            # The checks below only reword eager errors; the compiler raises its own.
            return program(self.model, *args, **kwargs)
        self._check_device(args, kwargs)
        self._check_dtype(args, kwargs)
        self._check_shape(args)
        # Anything else the model raises is the model's own error, passed on unchanged.
        return program(self.model, *args, **kwargs)

    def _check_device(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = model_device(self.model)
        if not tensors or device is None:
            return
        if tensors[0].device != device:
            raise FeaturescopeError(
                f"the model is on {device} but the input is on {tensors[0].device}; move one "
                f"to the other: model.to({str(tensors[0].device)!r}) or x.to({str(device)!r})."
            )

    def _check_dtype(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        dtype = model_dtype(self.model)
        if not tensors or dtype is None or not tensors[0].is_floating_point():
            return
        x = tensors[0]
        # Autocast casts the inputs of each layer itself, so other dtypes are meant there.
        if x.dtype != dtype and not _autocast_enabled(x.device):
            raise FeaturescopeError(
                f"the input is {x.dtype} but the model's parameters are {dtype}; convert one to "
                f"the other: x.to({dtype}) or model.to({x.dtype})."
            )

    def _check_shape(self, args: Sequence[Any]) -> None:
        """Refuse, before running, an input whose channels the model's first layer cannot take."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        expected = _first_layer_input(self.model, self._program)
        if x is None or expected is None or not x.is_floating_point():
            return
        dims, channels = expected
        batched = x.dim() == dims
        if (dims and x.dim() not in (dims, dims - 1)) or (
            x.shape[1 if batched or not dims else 0] if dims else x.shape[-1]
        ) != channels:
            where = "channels" if dims else "features (last dimension)"
            size = _zoo_input_size(self.model)
            hint = f" (the zoo's input size for it is {list(size)})" if size else ""
            raise InputShapeError(
                f"{type(self.model).__name__} cannot run on an input of shape {list(x.shape)}: "
                f"its first layer takes {channels} {where}{hint}. Check the image size and "
                "channels the model expects (featurescope.model_metadata(model).input_size for "
                "zoo models)."
            )

    def summary(
        self,
        input_size: Sequence[int] | None = None,
        *,
        print_fn: Callable[[str], Any] | None = print,
    ) -> list[NodeSummary]:
        """Print and return each tapped node's op, output shape and parameters, like torchsummary.

        The model runs once on zeros in eval mode (no BatchNorm statistics change) on its own
        device; every submodule's mode is restored afterwards.

        Args:
            input_size: ``(C, H, W)`` of one input; default: the zoo model's input size.
            print_fn: where to print the table; ``None`` prints nothing.

        Returns:
            One :class:`NodeSummary` per tapped node, in the order of ``eval_return_nodes``
            (the same as ``return_nodes`` unless the modes have their own).

        Raises:
            FeaturescopeError: no ``input_size`` was given and the model is not from the zoo.

        Example:
            >>> import featurescope as fs
            >>> tap = fs.FeatureTap(fs.create_model("alexnet"), ["conv1", "fc.4"])
            >>> rows = tap.summary(print_fn=None)
            >>> [(r.node, r.op, r.output_shape, r.params) for r in rows]
            [('conv1.2', 'MaxPool2d', (-1, 96, 27, 27), 34944), ('fc.4', 'ReLU', (-1, 2048), 0)]
        """
        size = tuple(input_size) if input_size is not None else _zoo_input_size(self.model)
        if size is None:
            raise FeaturescopeError(
                f"summary needs input_size=(C, H, W) for {type(self.model).__name__}, which is "
                "not a featurescope zoo model"
            )
        device = model_device(self.model) or torch.device("cpu")
        # The model's own floating dtype: a half or bfloat16 model would refuse float32 zeros.
        x = torch.zeros(2, *size, device=device, dtype=model_dtype(self.model) or torch.float32)
        with training_mode(self.model, False), torch.no_grad():
            outputs = self(x)
            program = self._program
            nodes, ops = dict(program.nodes), dict(program.ops)
        modules = dict(self.model.named_modules())
        rows = []
        for query, alias in self.eval_return_nodes.items():
            value = outputs[alias]
            shape = (-1, *value.shape[1:]) if isinstance(value, torch.Tensor) else ()
            module = modules.get(query)
            params = sum(p.numel() for p in module.parameters()) if module is not None else 0
            rows.append(NodeSummary(alias, nodes[alias], ops[alias], tuple(shape), params))
        if print_fn is not None:
            print_fn(_format_summary(rows, self.model))
        return rows

    def extract(
        self,
        data: Dataset[Any] | DataLoader[Any],
        *,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        reduce: Reduce = None,
        out: str | os.PathLike[str] | None = None,
        progress: bool = True,
        num_workers: int = 0,
        overwrite: bool = False,
    ) -> Extraction:
        """Run the tap over a whole dataset, in memory or streamed to disk.

        See :func:`featurescope.tap._extract.extract` for the details and the on-disk format.

        Args:
            data: a map-style ``Dataset`` whose items are an image tensor or a tuple
                ``(image, label, ...)``, or a ``DataLoader`` over one (its batch size, collate
                function and workers are used; its order is fixed once at the start).
            batch_size: images per forward when ``data`` is a Dataset.
            device: where to run; default: the model's device. The model must already be there.
            reduce: ``None`` (keep feature maps), ``"flatten"``, ``"avgpool"`` (mean over the
                spatial dims) or a callable ``tensor -> tensor``; applied on the device.
            out: a folder to stream to (one ``.npy`` per node plus ``manifest.json``); an
                interrupted extraction into the same folder resumes where it stopped.
            progress: show a tqdm progress bar.
            num_workers: DataLoader workers when ``data`` is a Dataset.
            overwrite: discard whatever extraction ``out`` holds and start afresh; without it
                a different extraction there (model, preprocessing, nodes, ``reduce``, number
                of samples or, where the dataset names them, files) is an error.

        Returns:
            An :class:`~featurescope.tap._extract.Extraction`: ``features`` (``{alias: array}``),
            ``sample_ids``, ``labels`` and ``paths`` where the dataset has them.
        """
        from featurescope.tap._extract import extract

        return extract(
            self,
            data,
            batch_size=batch_size,
            device=device,
            reduce=reduce,
            out=out,
            progress=progress,
            num_workers=num_workers,
            overwrite=overwrite,
        )


NodeRequest = Sequence[str] | Mapping[str, str]


def _node_sets(
    return_nodes: NodeRequest | None,
    train_return_nodes: NodeRequest | None,
    eval_return_nodes: NodeRequest | None,
) -> dict[bool, dict[str, str]]:
    """``{training: {node: alias}}``; one shared dict when ``return_nodes`` serves both modes."""
    separate = train_return_nodes is not None or eval_return_nodes is not None
    if return_nodes is not None and separate:
        raise FeaturescopeError(
            "give either return_nodes (the same nodes in both modes) or train_return_nodes and "
            "eval_return_nodes (one set per mode), not both."
        )
    if return_nodes is None and not separate:
        raise FeaturescopeError(
            "FeatureTap needs the nodes to return: return_nodes=['conv1', ...], or "
            "train_return_nodes and eval_return_nodes for a model whose graph differs between "
            "training and eval (featurescope.get_graph_node_names(model) lists them)."
        )
    if return_nodes is not None:
        shared = _normalize_return_nodes(return_nodes, "return_nodes")
        return {True: shared, False: shared}
    if train_return_nodes is None or eval_return_nodes is None:
        given, missing = (
            ("train_return_nodes", "eval_return_nodes")
            if eval_return_nodes is None
            else ("eval_return_nodes", "train_return_nodes")
        )
        raise FeaturescopeError(
            f"{given} needs {missing} too (as in torchvision); for the same nodes in both "
            "modes give return_nodes instead."
        )
    return {
        True: _normalize_return_nodes(train_return_nodes, "train_return_nodes"),
        False: _normalize_return_nodes(eval_return_nodes, "eval_return_nodes"),
    }


def _normalize_return_nodes(return_nodes: NodeRequest, argument: str) -> dict[str, str]:
    if isinstance(return_nodes, str):
        return_nodes = [return_nodes]
    if isinstance(return_nodes, Mapping):
        pairs = [(str(k), str(v)) for k, v in return_nodes.items()]
    else:
        pairs = [(str(n), str(n)) for n in return_nodes]
    if not pairs:
        raise FeaturescopeError(
            f"{argument} is empty; name at least one node, e.g. ['conv1'] "
            "(featurescope.get_graph_node_names(model) lists them)."
        )
    result: dict[str, str] = {}
    by_alias: dict[str, str] = {}
    for node, alias in pairs:
        if node in result:
            raise FeaturescopeError(f"{argument} names node {node!r} twice; name it once.")
        if alias in by_alias:
            raise FeaturescopeError(
                f"{argument} gives alias {alias!r} to both {by_alias[alias]!r} and {node!r}; "
                "aliases are the output's keys and must differ."
            )
        result[node] = alias
        by_alias[alias] = node
    return result


def _build_programs(
    model: nn.Module,
    node_sets: dict[bool, dict[str, str]],
    backend: Backend,
    tracer_kwargs: Mapping[str, Any] | None,
    concrete_args: dict[str, Any] | None,
) -> tuple[str, str | None, dict[bool, Program]]:
    """Pick the backend once: ``(backend in use, why fx was not, {training: program})``."""
    reason: str | None = None
    if backend in ("auto", "fx"):
        try:
            traces = [trace(model, mode, tracer_kwargs, concrete_args) for mode in (True, False)]
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if backend == "fx":
                raise FeaturescopeError(
                    f"torch.fx cannot trace {type(model).__name__} ({reason}). Use "
                    "backend='hooks' (module names only) or backend='auto'."
                ) from exc
            warnings.warn(
                f"torch.fx cannot trace {type(model).__name__}, so FeatureTap uses forward "
                f"hooks instead (module names only, whole modules). Reason: {reason}",
                FeaturescopeWarning,
                stacklevel=3,  # the caller of FeatureTap(...)
            )
        else:
            _check_names(traces, node_sets, model)
            fx_programs: dict[bool, Program] = {
                t.training: build_program(t, node_sets[t.training], model) for t in traces
            }
            return "fx", None, fx_programs
    # Only asked when a name is not a module, to tell an op ("add") from a typo.
    fx_names = (lambda: _eval_node_names(model)) if backend == "hooks" else None
    train = HookProgram(model, node_sets[True], fx_names)
    same = node_sets[False] is node_sets[True]
    evaluation = train if same else HookProgram(model, node_sets[False], fx_names)
    return "hooks", reason, {True: train, False: evaluation}


def _eval_node_names(model: nn.Module) -> list[str] | None:
    try:
        return get_graph_node_names(model)[1]
    except FeaturescopeError:
        return None


def _check_names(
    traces: Sequence[Trace], node_sets: Mapping[bool, Mapping[str, str]], model: nn.Module
) -> None:
    """Raise for a name in neither graph, or missing from the graph of a mode that asks for it."""
    by_mode = {t.training: t for t in traces}
    shared = node_sets[True] is node_sets[False]
    for training, nodes in node_sets.items():
        for query in nodes:
            if by_mode[training].has(query):
                continue
            if not by_mode[not training].has(query):
                names = list(dict.fromkeys(n for t in traces for n in t.names))
                raise node_not_found(query, names, model, "in training or eval mode")
            mode, other = ("eval", "training") if training else ("training", "eval")
            if shared:
                fix = (
                    "return_nodes must be in both modes; give train_return_nodes and "
                    "eval_return_nodes instead, one set per mode, as in torchvision."
                )
            else:
                fix = f"list it in {'eval' if training else 'train'}_return_nodes only."
            raise NodeNotFoundError(
                f"node {query!r} of {type(model).__name__} exists only in {mode} mode (the "
                f"model branches on self.training), not in {other} mode: {fix} Compare the "
                "two lists of featurescope.get_graph_node_names(model)."
            )


def _export_detectable() -> bool:
    """Whether this torch tells an export from a compile.

    ``torch.compiler.is_exporting`` is missing from older releases, and before 2.14 it also
    reads True under a plain ``torch.compile`` (seen on 2.9): there a hooks tap cannot refuse an
    export without refusing a compile too, and leaves torch.export to fail in its own words.
    """
    from torch.torch_version import TorchVersion

    return hasattr(torch.compiler, "is_exporting") and TorchVersion(torch.__version__) >= "2.14"


EXPORT_DETECTABLE = _export_detectable()


def _is_exporting() -> bool:
    return EXPORT_DETECTABLE and bool(torch.compiler.is_exporting())


def _autocast_enabled(device: torch.device) -> bool:
    return bool(torch.is_autocast_enabled(device.type))


_LAYER_DIMS = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.Linear: 0}


def _first_layer_input(model: nn.Module, program: Any) -> tuple[int, int] | None:
    """``(input dims, channels)`` the model's first layer takes, where that is known for sure.

    Known from the traced graph (the module the input goes into first, found once when the
    fx program was built), else from the zoo's input size; ``dims`` is 0 for a ``Linear``
    (which checks only the last dimension).
    """
    name = getattr(program, "input_module", None)  # the hooks backend traces no graph
    if name is not None:
        layer = model.get_submodule(name)
        dims = _LAYER_DIMS.get(type(layer))
        if dims is not None:
            channels = layer.in_features if dims == 0 else layer.in_channels
            return dims, int(channels)  # type: ignore[arg-type]
    size = _zoo_input_size(model)
    return (len(size) + 1, int(size[0])) if size else None


def _zoo_input_size(model: nn.Module) -> tuple[int, ...] | None:
    from featurescope.zoo.metadata import model_metadata

    meta = model_metadata(model)
    return meta.input_size if meta is not None else None


def _format_summary(rows: Sequence[NodeSummary], model: nn.Module) -> str:
    headers: tuple[str, ...] = ("Node", "Alias", "Op", "Output shape", "Params")
    table: list[tuple[str, ...]] = [
        (r.node, r.alias, r.op, str(list(r.output_shape)), f"{r.params:,}") for r in rows
    ]
    if all(r.alias == r.node for r in rows):
        headers, table = headers[:1] + headers[2:], [row[:1] + row[2:] for row in table]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i == len(cells) - 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(line(headers))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return "\n".join(
        [
            rule,
            line(headers),
            rule,
            *(line(row) for row in table),
            rule,
            f"Total params: {total:,}",
            f"Trainable params: {trainable:,}",
            rule,
        ]
    )
