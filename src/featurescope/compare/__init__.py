"""Representation similarity: linear CKA between any nodes of any two models.

:func:`compare` runs two models (or one model twice over) on the same batches of images and
returns a :class:`Comparison`: the matrix of linear CKA (centred kernel alignment, Kornblith et
al. 2019) between every node of one and every node of the other, each cell computed exactly over
the whole dataset in a streaming pass (``_estimators.ExactMoments``) or, for wide nodes, by the
unbiased minibatch estimator of Nguyen et al. (2021) (``_estimators.MinibatchHSIC``).
``_plan`` fixes the batches and which rank computes each, ``_cells`` picks each cell's estimator
and holds the sums, ``_checkpoint`` keeps them on disk for a resume. Draw the matrix with the
``similarity`` visualizer, or write it all (figure, CSV, JSON, a page) with
:func:`write_comparison`.
"""

from featurescope.compare._cells import (
    ESTIMATORS,
    MAX_EXACT_OFFSET,
    choose_estimators,
    exact_offset,
)
from featurescope.compare._compare import compare
from featurescope.compare._estimators import MIN_BATCH, hsic1
from featurescope.compare._result import Comparison
from featurescope.compare._write import comparison_table, write_comparison

__all__ = [
    "ESTIMATORS",
    "MAX_EXACT_OFFSET",
    "MIN_BATCH",
    "Comparison",
    "choose_estimators",
    "compare",
    "comparison_table",
    "exact_offset",
    "hsic1",
    "write_comparison",
]
