"""The ``montage`` visualizer: each query image beside its nearest images, with distances."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.errors import InputShapeError, VisualizationError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import new_figure, to_display_image, to_numpy
from featurescope.visualizers._titles import fit_suptitle

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["montage"]

_MATCH, _MISMATCH = "tab:green", "tab:red"


def _unpack_result(data: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    # Duck-typed so that visualizers never import the index: FAISS-style tuples, lists, and
    # result objects with .distances/.ids all fit.
    if hasattr(data, "distances") and hasattr(data, "ids"):
        distances, ids = data.distances, data.ids
    else:
        try:
            distances, ids = data
        except (TypeError, ValueError) as exc:
            raise InputShapeError(
                "montage takes a search result: a (distances, ids) pair as returned by "
                f"EmbeddingIndex.search, got {type(data).__name__}"
            ) from exc
    d = to_numpy(distances, "distances")
    i = to_numpy(ids, "ids")
    if d.ndim == 1:
        d, i = d[None], i[None]
    if d.ndim != 2 or d.shape != i.shape or d.shape[1] == 0:
        raise InputShapeError(
            "a search result's distances and ids must both be [nq, k] (or [k]) with k >= 1, "
            f"got {list(d.shape)} and {list(i.shape)}"
        )
    if not np.all(i == np.round(i)):
        raise InputShapeError("a search result's ids must be integers")
    return d, i.astype(np.int64)


def _is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"
    )


def _queries_list(queries: Any, nq: int) -> list[Any]:
    if isinstance(queries, (list, tuple)):
        items = list(queries)
    elif getattr(queries, "ndim", None) == 4:
        items = [queries[j] for j in range(len(queries))]
    else:
        items = [queries]
    if len(items) != nq:
        raise InputShapeError(
            f"the search result has {nq} queries but {len(items)} query images were given"
        )
    return items


def _split_item(item: Any) -> tuple[Any, Any]:
    # A torchvision-style dataset yields (image, label) pairs.
    if isinstance(item, tuple) and len(item) == 2 and not _is_number_like(item[0]):
        return item[0], item[1]
    return item, None


def _is_number_like(value: Any) -> bool:
    return isinstance(value, numbers.Number)


def _label_text(label: Any, class_names: Any) -> str:
    if hasattr(label, "item"):
        label = label.item()
    if label is None or (isinstance(label, numbers.Integral) and label < 0):
        # -1: an image without a class (a folder of unlabelled photos).
        return ""
    if class_names is not None and isinstance(label, numbers.Integral):
        try:
            return str(class_names[int(label)])
        except (IndexError, KeyError):
            return str(label)
    return str(label)


def _known(label: Any) -> bool:
    return label is not None and not (isinstance(label, numbers.Integral) and label < 0)


def _plain(label: Any) -> Any:
    return label.item() if hasattr(label, "item") else label


def _hit(label: Any, query_label: Any) -> bool | None:
    """Whether a neighbour's label is its query's; ``None`` where either is unknown."""
    label, query_label = _plain(label), _plain(query_label)
    if not (_known(label) and _known(query_label)):
        return None
    return bool(label == query_label)


def _hits_array(hits: Any, shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    array = to_numpy(hits, "hits")
    if array.ndim == 1:
        array = array[None]
    if array.shape != shape:
        raise InputShapeError(
            f"hits must be [nq, k] like the search result's ids {list(shape)}, got "
            f"{list(array.shape)}"
        )
    return array.astype(bool)


def _show(ax: Axes, image: Any, caption: str, what: str, colour: str = "black") -> None:
    picture = to_display_image(image, what)
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_title(caption, fontsize=7, color=colour, pad=2)
    ax.set_axis_off()


def montage(
    data: Any,
    *,
    images: Any,
    queries: Any = None,
    labels: Any = None,
    query_labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    hits: Any = None,
    title: str | None = None,
    panel_size: float = 1.6,
    fmt: str = ".3g",
) -> Figure:
    """Draw each query image beside its k nearest images, captioned with distance and label.

    One row per query: the study's figure of a query and its ten neighbours. A hit (a
    neighbour of the query's class) is captioned in green, a miss in red.

    Args:
        data: a search result, ``(distances, ids)`` each ``[nq, k]`` (or ``[k]`` for one
            query), as :meth:`EmbeddingIndex.search` and FAISS return it; an object with
            ``.distances`` and ``.ids`` also works. An id of ``-1`` (no neighbour) leaves an
            empty panel.
        images: what the ids index: a list or dict of images or image paths, a ``[N, 3, H, W]``
            tensor, or a dataset whose items are ``(image, label)``.
        queries: the query images, one per row (a list, a ``[nq, 3, H, W]`` tensor, or one
            image when ``nq == 1``); an int is an id into ``images``. ``None`` draws only the
            neighbours.
        labels: labels indexable by id (default: taken from ``(image, label)`` items).
        query_labels: one label per query (default: from ``labels`` when a query is an id).
        class_names: names of integer labels, e.g. a dataset's ``classes``.
        hits: ``[nq, k]`` booleans (``[k]`` for one query), whether each neighbour is a hit;
            default: a neighbour whose label equals its query's label is a hit, and one with
            either label unknown (``None`` or negative) is neither, captioned in black.
        title: the figure's title.
        panel_size: each panel's side in inches.
        fmt: format spec for the distances.

    Returns:
        A figure with ``nq × (k + 1)`` axes (``nq × k`` without ``queries``).

    Raises:
        InputShapeError: ``data`` is not a search result, ``queries`` does not have one
            image per query, or ``hits`` is not shaped as the result's ids.
        VisualizationError: an id is not in ``images``.

    Example:
        >>> import torch
        >>> images = torch.rand(6, 3, 8, 8)
        >>> result = (torch.tensor([[0.0, 0.5, 0.9]]), torch.tensor([[2, 4, 1]]))
        >>> fig = montage(result, images=images, queries=[2], labels=[0, 1, 0, 1, 1, 0])
        >>> len(fig.axes)
        4
    """
    distances, ids = _unpack_result(data)
    nq, k = ids.shape
    query_items = None if queries is None else _queries_list(queries, nq)
    if query_labels is not None and len(query_labels) != nq:
        raise InputShapeError(f"query_labels has {len(query_labels)} labels for {nq} queries")
    given_hits = None if hits is None else _hits_array(hits, (nq, k))

    def lookup(i: int) -> tuple[Any, Any]:
        try:
            image, label = _split_item(images[i])
        except (IndexError, KeyError) as exc:
            raise VisualizationError(
                f"id {i} of the search result is not in images ({type(images).__name__} of "
                f"length {len(images) if hasattr(images, '__len__') else '?'})"
            ) from exc
        if labels is not None:
            label = labels[i]
        return image, label

    cols = k + (query_items is not None)
    heading, header = fit_suptitle(title, cols * panel_size) if title else ("", 0.0)
    header = max(header, 0.4) if title else 0.0
    fig = new_figure(cols * panel_size, nq * panel_size * 1.3 + header)
    for row in range(nq):
        query_label: Any = None if query_labels is None else query_labels[row]
        col = 0
        if query_items is not None:
            query = query_items[row]
            if _is_id(query):
                query, label = lookup(int(query))
                query_label = label if query_label is None else query_label
            ax = fig.add_subplot(nq, cols, row * cols + 1)
            text = _label_text(query_label, class_names)
            _show(ax, query, f"query\n{text}" if text else "query", "query image")
            col = 1
        for j in range(k):
            ax = fig.add_subplot(nq, cols, row * cols + col + j + 1)
            ax.set_axis_off()
            neighbour = int(ids[row, j])
            if neighbour < 0:
                ax.set_title("no match", fontsize=7, pad=2)
                continue
            image, label = lookup(neighbour)
            text = _label_text(label, class_names)
            hit = _hit(label, query_label) if given_hits is None else bool(given_hits[row, j])
            colour = "black" if hit is None else _MATCH if hit else _MISMATCH
            caption = f"{j + 1}: {distances[row, j]:{fmt}}" + (f"\n{text}" if text else "")
            _show(ax, image, caption, f"image {neighbour}", colour)
    top = 1.0 - header / fig.get_figheight() - 0.01
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.45)
    if title:
        fig.suptitle(heading)
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"montage": montage}
