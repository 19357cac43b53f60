"""The plugin behind :func:`~featurescope.zoo.register_model`: models defined in a script.

A builtin plugin like the others, so that a model registered in code reaches the zoo the way
every model does, through ``featurescope_register_models``, and takes part in the same clash
and override rules.

Example:
    >>> import torch.nn as nn
    >>> from featurescope.zoo import list_models, register_model
    >>> @register_model("probe_doc")
    ... def probe(num_classes=5):
    ...     return nn.Linear(4, num_classes)
    >>> list_models("probe_doc"), remove("probe_doc"), list_models("probe_doc")
    (['probe_doc'], None, [])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from featurescope.errors import UnknownNameError, did_you_mean
from featurescope.hookspecs import hookimpl
from featurescope.plugins import invalidate

if TYPE_CHECKING:
    from featurescope.zoo._registry import ModelSpec

__all__ = ["add", "remove"]

_SPECS: dict[str, ModelSpec] = {}


def add(name: str, spec: ModelSpec) -> None:
    """Give model ``name`` to the zoo (what :func:`~featurescope.zoo.register_model` calls)."""
    _SPECS[name] = spec
    invalidate()


def remove(name: str) -> None:
    """Take back a model registered with :func:`~featurescope.zoo.register_model`.

    Raises:
        UnknownNameError: no model of that name was registered in code.
    """
    if _SPECS.pop(name, None) is None:
        raise UnknownNameError(
            f"no model named {name!r} was registered with register_model."
            f"{did_you_mean(name, _SPECS)}"
        )
    invalidate()


@hookimpl
def featurescope_register_models() -> Mapping[str, ModelSpec]:
    return dict(_SPECS)
