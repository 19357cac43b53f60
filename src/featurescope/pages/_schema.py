"""The explorer's data: plain, JSON-able structures, the one contract between the builder and
every page that draws them (the static explorer, the units page, the app).

Pictures travel once: every image a page shows (a query as the model saw it, a gallery
thumbnail, a unit's patch or projection) is one ``data:`` URL in :attr:`ExplorerData.images`,
and everything else names it by its position there. Maps travel as :func:`packed
<featurescope.pages.packed>` bytes: each map scaled to 0-255 on its own, zlib-compressed,
base64-encoded.
"""

from __future__ import annotations

from typing import TypedDict


class Wording(TypedDict):
    """How the page names its queries and its gallery: the study's splits, or a folder."""

    query: str
    queries: str
    a_query: str
    gallery: str


class Run(TypedDict):
    """One training run's curves, one value per epoch."""

    name: str
    train_loss: list[float]
    val_loss: list[float]
    train_acc: list[float]
    val_acc: list[float]


class Query(TypedDict):
    """One query image and what the model made of it.

    ``neighbours`` are ``[gallery id, distance]`` pairs, nearest first; ``image`` is the
    picture's position in :attr:`ExplorerData.images`; ``cam`` the packed Grad-CAM of the
    predicted class (``cam_side`` × ``cam_side``), or ``None``.
    """

    path: str
    name: str
    id: int | None
    label: int
    predicted: int | None
    predicted_name: str | None
    image: int
    neighbours: list[list[float]]
    cam: str | None


class GalleryImage(TypedDict):
    """A gallery image the page shows; ``image`` is ``None`` where its file is missing."""

    id: int
    label: int
    path: str | None
    name: str
    image: int | None


class MapEntry(TypedDict):
    """One query's maps at one stage: the carried channels, strongest mean first.

    ``data`` holds ``len(order)`` maps of ``shipped[1] × shipped[2]`` bytes, in ``order``;
    ``sum`` the sum over every channel.
    """

    order: list[int]
    means: list[float]
    data: str
    sum: str


class Stage(TypedDict):
    """A stage's feature maps: ``shape`` ``[C, H, W]`` as the model made them, ``shipped``
    ``[channels carried, h, w]`` as the page carries them; ``maps`` one entry per query."""

    name: str
    label: str
    shape: list[int]
    shipped: list[int]
    maps: list[MapEntry]


class Projection(TypedDict):
    """The gallery in 2-D: ``points`` ``[id, x, y]`` and each point's neighbours by id."""

    method: str
    points: list[list[float]]
    neighbours: dict[str, list[list[float]]]


class SimilarityTable(TypedDict):
    """Representation similarity between nodes of two models (linear CKA)."""

    name: str
    model_a: str
    model_b: str
    nodes_a: list[str]
    nodes_b: list[str]
    matrix: list[list[float | None]]
    estimators: list[list[str]] | None
    num_images: int | None


class UnitExample(TypedDict):
    """One of a channel's top activations over the dataset, strongest first.

    ``source`` is the image's position in :attr:`Units.sources`; ``box`` the receptive field
    ``(top, left, bottom, right)`` on the model's input; ``patch``, ``deconvnet`` and
    ``guided`` positions in :attr:`ExplorerData.images` (``None`` when not computed); ``map``
    the packed channel map on that image (``UnitStage.shipped`` sized).
    """

    source: int
    value: float
    position: list[int]
    box: list[int]
    patch: int
    deconvnet: int | None
    guided: int | None
    map: str


class Unit(TypedDict):
    """One channel and its top-k examples; ``tile`` is its strongest patch's picture."""

    channel: int
    tile: int
    top: list[UnitExample]


class UnitStage(TypedDict):
    """A node's channels: ``grid`` the node's ``[h, w]``, ``shipped`` the ``[h, w]`` of the
    maps as carried (average-pooled when large), ``field`` the receptive field's
    ``[height, width]`` in input pixels (``None`` when global)."""

    name: str
    label: str
    channels: int
    grid: list[int]
    shipped: list[int]
    field: list[int] | None
    units: list[Unit]


class UnitSource(TypedDict):
    """An image some unit's top activations come from: its picture as the model saw it."""

    name: str
    image: int
    label: int


class Units(TypedDict):
    """What each channel of some nodes sees: its top ``k`` over ``num_images`` images."""

    k: int
    reduce: str
    num_images: int
    input_size: list[int]
    sources: list[UnitSource]
    stages: list[UnitStage]


class ExplorerData(TypedDict):
    """Everything the explorer page draws, as :func:`build_explorer_data
    <featurescope.pages.build_explorer_data>` builds it.

    Keys: the page's ``title``, featurescope's ``version``; the ``model``, its embedding
    ``node``, its ``weights`` origin and a sentence saying it (``weights_sentence``); ``k``
    neighbours per query and whether a query is left out of its own (``exclude_self``); the
    gallery's ``classes`` and the page's ``wording``; ``display_size``, the side of the map
    canvases; training ``runs``; retrieval ``metrics`` (``{row: {name: value}}``); ``notes``
    (warnings by key); ``images`` (every picture, once); ``queries``; the Grad-CAM node,
    side and the reason there is none (``cam_node``, ``cam_side``, ``no_cam_reason``); the
    ``gallery`` images shown; the ``stages``' maps; the ``projection``; ``similarity``
    tables; and ``units`` (``None`` where none were computed).
    """

    title: str
    version: str
    model: str
    node: str
    weights: str | None
    weights_sentence: str
    k: int
    exclude_self: bool
    classes: list[str]
    wording: Wording
    display_size: int
    runs: list[Run]
    metrics: dict[str, dict[str, float]]
    notes: dict[str, str]
    images: list[str]
    queries: list[Query]
    cam_node: str | None
    cam_side: int
    no_cam_reason: str
    gallery: list[GalleryImage]
    stages: list[Stage]
    projection: Projection
    similarity: list[SimilarityTable]
    units: Units | None
