"""Draw feature maps, search results and training curves; every visualizer is a plugin.

The builtin visualizers (``grid``, ``sum``, ``overlay``, ``montage``, ``curves``) are ordinary
plugin modules that implement
:func:`~featurescope.hookspecs.featurescope_register_visualizers`; a third-party plugin adds
its own, or overrides a builtin, the same way. All of them return a
:class:`matplotlib.figure.Figure` built without pyplot, so they run headless and in threads.

Each builtin is also a plain function here, with its options in its signature:
:func:`grid`, :func:`channel_sum` (``"sum"``), :func:`overlay`, :func:`montage`,
:func:`curves`, :func:`similarity` and :func:`units` (as torchvision's ``models.resnet50`` is
the function while ``models.resnet`` is its module, ``featurescope.visualizers.grid`` is the
function; :func:`visualize` calls whichever plugin holds a name now).

Example:
    >>> import torch, featurescope
    >>> fig = featurescope.visualize("sum", torch.rand(16, 13, 13), title="conv2")
    >>> len(fig.axes)  # the map and its colour bar
    2
    >>> len(grid(torch.rand(16, 13, 13), max_channels=4).axes)
    4
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurescope.errors import (
    FeaturescopeError,
    PluginError,
    UnknownNameError,
    VisualizationError,
    did_you_mean,
)
from featurescope.plugins import Registry
from featurescope.visualizers._layout import as_maps

# Each name is the function, not its module (the module stays importable by its full name).
from featurescope.visualizers.curves import curves
from featurescope.visualizers.grid import grid
from featurescope.visualizers.montage import montage
from featurescope.visualizers.overlay import overlay
from featurescope.visualizers.similarity import similarity
from featurescope.visualizers.sum import channel_sum
from featurescope.visualizers.units import units

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "VISUALIZERS",
    "as_maps",
    "channel_sum",
    "curves",
    "get_visualizer",
    "grid",
    "list_visualizers",
    "montage",
    "overlay",
    "save",
    "similarity",
    "units",
    "visualize",
]

_HOOK = "featurescope_register_visualizers"
_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def _as_visualizer(name: str, value: Any, plugin: str) -> Callable[..., Any]:
    if not callable(value):
        raise PluginError(
            f"plugin {plugin!r} registered visualizer {name!r} as {type(value).__name__}; "
            "expected a callable(data, **options) returning a matplotlib Figure"
        )
    return value  # type: ignore[no-any-return]


#: Every visualizer the plugins give, by name.
VISUALIZERS: Registry[Callable[..., Any]] = Registry(
    _HOOK, "visualizer", _as_visualizer, lister="featurescope.visualizers.list_visualizers()"
)


def list_visualizers(pattern: str | None = None) -> list[str]:
    """Names of the available visualizers, sorted, optionally filtered by a shell-style pattern.

    Example:
        >>> list_visualizers()
        ['curves', 'gradcam', 'grid', 'montage', 'overlay', 'similarity', 'sum', 'units']
    """
    return VISUALIZERS.names(pattern)


def _lookup(name: str) -> tuple[Callable[..., Any], str]:
    entry = VISUALIZERS.get(name)
    return entry.value, entry.plugin


def get_visualizer(name: str) -> Callable[..., Any]:
    """The callable registered as visualizer ``name``, e.g. to read its docstring.

    Raises:
        UnknownNameError: no visualizer has that name; the message lists the closest names.

    Example:
        >>> get_visualizer("grid").__name__
        'grid'
    """
    return _lookup(name)[0]


def _check_options(name: str, function: Callable[..., Any], options: dict[str, Any]) -> None:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let it judge its own options
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for i, p in enumerate(params.values())
        if i > 0 and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for option in options:
        if option not in accepted:
            raise UnknownNameError(
                f"visualizer {name!r} has no option {option!r}.{did_you_mean(option, accepted)} "
                f"Its options are: {', '.join(accepted) or 'none'}."
            )
    # Without this the call's TypeError would surface as a PluginError, blaming the plugin.
    missing = [
        p.name
        for p in params.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in options
    ]
    if missing:
        raise VisualizationError(
            f"visualizer {name!r} needs the option(s) {', '.join(map(repr, missing))}, e.g. "
            f"visualize({name!r}, data, {missing[0]}=...); see "
            f"featurescope.visualizers.get_visualizer({name!r}).__doc__"
        )


def visualize(name: str, data: Any, **options: Any) -> Figure:
    """Draw ``data`` with the visualizer called ``name`` and return the figure.

    Args:
        name: a name from :func:`list_visualizers`: ``"grid"``, ``"sum"``, ``"overlay"``,
            ``"montage"``, ``"curves"``, or a plugin's.
        data: what that visualizer draws: a ``[C, H, W]`` tensor or array for feature maps,
            a ``(distances, ids)`` search result for ``montage``, ``{run: history}`` for
            ``curves``. See each visualizer's docstring (:func:`get_visualizer`).
        **options: the visualizer's keyword options.

    Returns:
        A :class:`matplotlib.figure.Figure`; write it with :func:`save`.

    Raises:
        UnknownNameError: no visualizer or option has that name (the message suggests close
            names).
        InputShapeError: ``data`` does not have a shape the visualizer draws.
        VisualizationError: an option has a value the visualizer cannot use, or a required
            option (``images=`` of ``montage``, ``image=`` of ``overlay``) is missing.
        PluginError: the visualizer failed in another way, or returned something that is not
            a figure; the message names its plugin.

    Example:
        >>> import torch
        >>> fig = visualize("grid", torch.rand(12, 7, 7), max_channels=4, order="l2")
        >>> len(fig.axes)
        4
    """
    function, plugin = _lookup(name)
    _check_options(name, function, options)
    try:
        fig = function(data, **options)
    except FeaturescopeError:
        raise
    except Exception as exc:
        raise PluginError(
            f"visualizer {name!r} (from plugin {plugin!r}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise PluginError(
            f"visualizer {name!r} (from plugin {plugin!r}) returned {type(fig).__name__}, "
            "not a matplotlib.figure.Figure"
        )
    return fig


def save(
    fig: Figure, path: str | os.PathLike[str], *, dpi: float | None = None, **kwargs: Any
) -> Path:
    """Write a figure to ``path`` atomically, as PNG, SVG or PDF according to its extension.

    The file appears complete or not at all: it is written beside ``path`` and renamed into
    place. Parent folders are created.

    Args:
        fig: a figure, e.g. from :func:`visualize`.
        path: where to write it; the suffix (``.png``, ``.svg``, ``.pdf``) picks the format.
        dpi: resolution of raster output; default matplotlib's ``savefig.dpi``.
        **kwargs: passed to :meth:`matplotlib.figure.Figure.savefig` (e.g. ``transparent``).

    Returns:
        The path written.

    Raises:
        VisualizationError: the extension is not one of ``.png``, ``.svg``, ``.pdf``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> out = save(visualize("sum", torch.rand(3, 5, 5)), pathlib.Path(tempfile.mkdtemp()) / "s.png")
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    from featurescope._io import atomic_path

    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise VisualizationError(
            f"cannot tell the image format of {os.fspath(path)!r}; end the file name with "
            f"{', '.join(_FORMATS)}"
        )
    with atomic_path(target) as tmp:
        # The temporary name ends in .tmp, so the format must be passed explicitly.
        fig.savefig(tmp, format=fmt, dpi=dpi if dpi is not None else "figure", **kwargs)
    return target
