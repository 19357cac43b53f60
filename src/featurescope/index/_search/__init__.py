"""The exact search, private to :mod:`featurescope.index`; nothing here is public API.

One idea per module: ``_metric`` (what near means: exact float64 keys and the proven bounds of
the fast pass, per metric), ``_gallery`` (the rows a search reads, tile by tile), ``_plan``
(tiles sized to the memory budget), ``_backends`` (the matrix product: small backend objects,
raced once), ``_selection`` (candidates of a score block), ``_rerank`` (float64 re-rank, second
pass, exhaustive search), ``_merge`` (the one (key, id) order), ``_schedule`` (workers, streams,
and :func:`search_exact`, the entry point), ``_threads`` (single-threaded workers without
process-wide settings), ``_config`` (:class:`SearchConfig`) and ``_profile`` (time breakdown
for the benchmark). It takes tensors and knows nothing of ids, labels or files:
:class:`~featurescope.EmbeddingIndex` does that.
"""
