"""Every hook specification featurescope calls, one body-less function each.

Plugins implement these with :data:`featurescope.hookimpl`. A hook here that has no
``test_hook_<name>`` in the tests, or no section in the plugin-author guide, fails the test suite.

featurescope calls every implementation under its plugin's name: an exception raised inside a
hook reaches the caller as a :class:`~featurescope.errors.PluginError` naming the plugin and the hook.

Example:
    A plugin module adding one visualizer::

        from featurescope import hookimpl

        @hookimpl
        def featurescope_register_visualizers():
            return {"histogram": draw_histogram}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("featurescope")
#: Marks a plugin's hook implementations; also importable as ``featurescope.hookimpl``.
hookimpl = pluggy.HookimplMarker("featurescope")


@hookspec
def featurescope_register_models() -> Mapping[str, Any]:  # type: ignore[empty-body]
    """Add models to the zoo.

    Returns:
        A mapping ``{name: builder}``. A builder is either a
        :class:`~featurescope.zoo.ModelSpec` (a builder with its preprocessing, input size and
        description) or a plain callable ``builder(num_classes=..., **kwargs) -> nn.Module``.
        Every plugin's mapping is merged into the zoo; :func:`featurescope.create_model` and
        :func:`featurescope.list_models` see them by name.

    Not ``firstresult``: all plugins are called. A name given by a builtin plugin may be
    overridden by a third-party plugin; two third-party plugins giving one name is a
    :class:`~featurescope.errors.PluginError` naming both.
    """


@hookspec
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Any]]:  # type: ignore[empty-body]
    """Add visualizers, usable as ``featurescope.visualize(name, data, **options)``.

    Returns:
        A mapping ``{name: callable}`` where ``callable(data, **options)`` returns a
        :class:`matplotlib.figure.Figure`. ``data`` is whatever the visualizer documents: a
        ``[C, H, W]`` tensor for feature maps, a search result for montages, a history for curves.

    Not ``firstresult``: all plugins are called, and the same override and clash rules as
    :func:`featurescope_register_models` apply.

    A visualizer should build its figure as ``matplotlib.figure.Figure(...)``, not through
    pyplot, so that it runs headless and in threads, and take its options as keyword
    arguments: :func:`featurescope.visualize` rejects an option the callable does not accept,
    naming the close ones. It should raise :class:`~featurescope.errors.InputShapeError` or
    :class:`~featurescope.errors.VisualizationError` for data or options it cannot draw; any other
    exception reaches the caller as a :class:`~featurescope.errors.PluginError` naming the plugin.
    """


@hookspec
def featurescope_features_extracted(features: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Called after :meth:`featurescope.FeatureTap.extract` has extracted its part of the data.

    Under ``torch.distributed`` it is called on every rank, with that rank's own part and before
    rank 0 merges the shards of an on-disk extraction (``info["rank"]`` and
    ``info["world_size"]`` tell which); in a single process, once, with everything.

    Args:
        features: ``{alias: array}`` of what this rank extracted, as returned to the caller
            (NumPy arrays, memory-mapped when the extraction was written to disk).
        info: a description of the run, with exactly these keys: ``model`` (the model's zoo
            name, else its class name), ``nodes`` (``{alias: node}``), ``num_samples`` (rows on
            this rank), ``reduce`` (the reduction's name or ``None``), ``out`` (the output
            folder or ``None``), ``labels``, ``sample_ids`` and ``paths`` (this rank's rows,
            ``None`` where unknown), ``rank`` and ``world_size``.

    Returns:
        Nothing; return values are ignored. Not ``firstresult``: every plugin is called, so
        several can log, export or summarise the same features.
    """
