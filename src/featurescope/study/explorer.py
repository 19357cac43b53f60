"""``featurescope explore``'s page of a saved image search, over :mod:`featurescope.pages`.

The page itself is built and rendered in :mod:`featurescope.pages`
(:func:`~featurescope.pages.write_explorer`, :func:`~featurescope.pages.build_explorer_data`);
its names stay importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from featurescope.errors import FeaturescopeError
from featurescope.pages import query_images, read_explorer_data, write_explorer
from featurescope.study._search import ImageSearch

__all__ = ["explore_index", "query_images", "read_explorer_data", "write_explorer"]

PathLike = str | os.PathLike[str]


def explore_index(
    index: PathLike,
    images: PathLike | None = None,
    out: PathLike = "explorer.html",
    *,
    k: int = 10,
    queries: int = 40,
    root: PathLike | None = None,
    keep_self: bool = False,
) -> Path:
    """Write the explorer page of a saved :class:`~featurescope.ImageSearch`.

    Args:
        index: a folder written by :meth:`ImageSearch.save <featurescope.ImageSearch.save>` or
            ``featurescope index build``.
        images: the query images: a folder (class subfolders named as the index's classes
            mark hits and score precision) or one file; default: ``queries`` of the indexed
            images themselves (those whose files are there), evenly spaced.
        out: the HTML file to write.
        k: neighbours shown per query.
        queries: how many query images at most.
        root: where the indexed images are now, if their folder moved (see
            :meth:`ImageSearch.load <featurescope.ImageSearch.load>`).
        keep_self: keep a query that is in the gallery among its own neighbours.

    Returns:
        The page's path.

    Raises:
        FeaturescopeError: none of the indexed images is where the index says and no
            ``images`` are given (re-point the folder with ``root``).
    """
    search = ImageSearch.load(index, root=root)
    if images is not None:
        paths, labels = query_images(images, search.class_names, limit=queries)
    else:
        where, by_id = search.image_paths(), search.labels()
        present = [i for i in sorted(where) if where[i] and os.path.isfile(where[i] or "")]
        if not present:
            raise FeaturescopeError(
                f"none of the {len(where)} indexed images is there to query: "
                f"{search.missing_summary() or 'the index records no paths'}"
            )
        step = max(1, -(-len(present) // queries))
        picked = present[::step]
        paths, labels = [where[i] or "" for i in picked], [by_id[i] for i in picked]
    return write_explorer(
        out,
        search,
        paths,
        query_labels=labels,
        k=k,
        title=f"featurescope explorer: {Path(index).name}",
        keep_self=keep_self,
    )
