"""The explorer page, now built in :mod:`featurescope.pages`; these names stay for old imports.

See :func:`featurescope.pages.write_explorer` and :func:`featurescope.pages.build_explorer_data`.
"""

from featurescope.pages import explore_index, query_images, read_explorer_data, write_explorer

__all__ = ["explore_index", "query_images", "read_explorer_data", "write_explorer"]
