"""What a channel sees: its top activations over a dataset, their patches and projections.

:func:`top_activations` streams a dataset through a :class:`~featurescope.FeatureTap` and keeps
each channel's strongest images (Zeiler & Fergus, "Visualizing and Understanding Convolutional
Networks", 2014), resumably and across ``torch.distributed`` ranks
(:func:`featurescope.tap.fold`); receptive fields come from :func:`featurescope.tap.receptive_field`;
:func:`patch` and :func:`project` / :func:`projections` show one activation;
:func:`write_units` writes all of it for every channel of some nodes to a folder
(``featurescope units``).
"""

from featurescope.units._patch import patch
from featurescope.units._project import project, projections
from featurescope.units._top import TopActivations, merge_top_activations, top_activations
from featurescope.units._write import UNITS_FILE, write_units

__all__ = [
    "UNITS_FILE",
    "TopActivations",
    "merge_top_activations",
    "patch",
    "project",
    "projections",
    "top_activations",
    "write_units",
]
