"""Search by image: exact, memory-bounded Euclidean nearest neighbours over embeddings.

:class:`EmbeddingIndex` holds vectors with ids, labels and metadata and answers exact k-nearest
neighbour queries; :class:`ShardedEmbeddingIndex` spreads one over ``torch.distributed`` ranks;
:func:`retrieval_metrics` scores a retrieval against labels. The index knows nothing of models:
it takes tensors and returns ``(distances, ids)`` as FAISS does.

Layout: ``_embedding`` (the index), ``_checks`` (input validation at the public boundary),
``_store`` (growing storage), ``_persist`` (safetensors + JSON files), ``_sharded``,
``_metrics``, and ``_search/`` (the exact search, private: metrics and bounds, gallery, tiles, product backends, selection, re-rank, scheduling).
"""

from featurescope.index._embedding import EmbeddingIndex
from featurescope.index._metrics import retrieval_metrics
from featurescope.index._result import SearchResult
from featurescope.index._search._config import SearchConfig
from featurescope.index._sharded import ShardedEmbeddingIndex

__all__ = [
    "EmbeddingIndex",
    "SearchConfig",
    "SearchResult",
    "ShardedEmbeddingIndex",
    "retrieval_metrics",
]
