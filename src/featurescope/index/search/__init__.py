"""The exact search kernel: tiles sized to a memory budget, a float32 or bfloat16 matrix
product with a proven rounding bound, a two-level selection, a float64 re-rank and one (distance, id) merge (``_merge``).

``_kernel`` plans and runs the tiles, ``_gemm`` picks the product backend (torch's or numpy's sgemm, or bfloat16) by timing,
``_parallel`` runs query batches on single-threaded workers. It takes tensors and knows nothing
of ids, labels or files: :class:`~featurescope.EmbeddingIndex` does that.
"""

from featurescope.index.search._gemm import chosen_backends
from featurescope.index.search._kernel import (
    MAX_NORM,
    NORM_CELLS,
    Gallery,
    TilePlan,
    centred_sq_norms,
    plan_tiles,
    rounding_error,
    search_exact,
)
from featurescope.index.search._merge import lex_smallest
from featurescope.index.search._metric import METRICS, Metric, exact_distances, metric_named
from featurescope.index.search._profile import time_breakdown

__all__ = [
    "METRICS",
    "Metric",
    "metric_named",
    "MAX_NORM",
    "NORM_CELLS",
    "Gallery",
    "TilePlan",
    "centred_sq_norms",
    "chosen_backends",
    "exact_distances",
    "lex_smallest",
    "plan_tiles",
    "rounding_error",
    "search_exact",
    "time_breakdown",
]
