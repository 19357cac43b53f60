"""The one interface FeatureTap runs its backends through.

A *program* is what a backend builds for one set of requested nodes: it runs the model and
returns ``{alias: output}``. The torch.fx backend (:class:`~featurescope.tap._fx.FxProgram`,
one per training mode) and the hooks backend (:class:`~featurescope.tap._hooks.HookProgram`)
both implement it, so :class:`~featurescope.FeatureTap` picks its programs once, at
construction, and never asks again which backend it holds (einops' ``_backends.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import nn

__all__ = ["Program"]


class Program(Protocol):
    """Runs a model and returns the outputs of the nodes it was built for."""

    @property
    def nodes(self) -> Mapping[str, str]:
        """``{alias: node}``: the graph node (or module) each alias resolved to."""
        ...

    @property
    def ops(self) -> Mapping[str, str]:
        """``{alias: op}``: what each node computes (``"Conv2d"``, ``"add"``, ...)."""
        ...

    @property
    def copied(self) -> Sequence[str]:
        """Aliases copied because a later in-place op overwrites them (known before a run)."""
        ...

    @property
    def export_blocker(self) -> str | None:
        """Why ``torch.export`` cannot capture this program, or ``None`` if it can."""
        ...

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run ``model`` on the inputs; return ``{alias: output}`` in the order of the request."""
        ...
