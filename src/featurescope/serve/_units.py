"""The units a photo excites most: its strongest channels at each node where units were
computed over the gallery, each with the gallery patches that excite that channel most."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from featurescope.errors import FeaturescopeError

if TYPE_CHECKING:
    from featurescope.study import ImageSearch
    from featurescope.tap import ReceptiveField
    from featurescope.units import TopActivations

__all__ = ["UNITS_SHOWN", "GalleryImages", "UnitsView", "channel_scores"]

#: Channels listed per node: the photo's strongest.
UNITS_SHOWN = 6


class GalleryImages(Dataset[tuple[torch.Tensor, int]]):
    """The gallery's images in the index's order, preprocessed as the search's model takes
    them: run :func:`featurescope.units.top_activations` over this and its ``image_ids`` are
    positions in the index, as :func:`featurescope.serve.create_app`'s ``units`` expects.

    Example:
        >>> import tempfile, featurescope as fs
        >>> from featurescope.serve import GalleryImages
        >>> root = fs.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=1,
        ...                                  val_per_class=0, test_per_class=0, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> images = GalleryImages(search)
        >>> len(images) == len(search.index), images[0][0].shape
        (True, torch.Size([3, 227, 227]))
    """

    def __init__(self, search: ImageSearch) -> None:
        self.search = search
        self.paths = list(search.index.metadata)
        self.labels = search.index.labels.tolist()
        self.transform = search.preprocessing.transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        from featurescope.data.folders import load_rgb

        path = self.paths[position]
        if path is None:
            raise FeaturescopeError(f"gallery image {position} has no file to read")
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as exc:
            raise FeaturescopeError(f"cannot read gallery image {path!r}: {exc}") from exc
        tensor: torch.Tensor = self.transform(image)
        return tensor, int(self.labels[position])


def channel_scores(value: Any) -> torch.Tensor | None:
    """One image's score per channel, as ``top_activations(reduce="max")`` scores it: its
    strongest position; ``None`` for an output with no channels.

    Example:
        >>> channel_scores(torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])).tolist()
        [3.0, 2.0]
    """
    if not isinstance(value, torch.Tensor):
        return None
    if value.dim() == 4:
        return value[0].flatten(1).amax(dim=1).float().cpu()
    if value.dim() == 3:  # tokens [1, T, D]: a channel is a feature, over the tokens
        return value[0].amax(dim=0).float().cpu()
    if value.dim() == 2:
        return value[0].float().cpu()
    return None


class UnitsView:
    """Each node's top activations over the gallery, read for one photo at a time."""

    def __init__(
        self, search: ImageSearch, units: Mapping[str, TopActivations], rows: Mapping[int, int]
    ) -> None:
        self.search = search
        self.units = dict(units)
        self.nodes = list(self.units)
        self.ids = list(rows)
        for node, top in self.units.items():
            bad = top.image_ids[(top.image_ids >= len(self.ids))]
            if len(bad):
                raise FeaturescopeError(
                    f"units at {node!r} name image {int(bad[0])}, but the gallery holds "
                    f"{len(self.ids)}: compute them over GalleryImages(search)"
                )
        self.fields: dict[str, ReceptiveField] = {}
        if self.nodes:
            from featurescope.tap import receptive_fields

            size = search.preprocessing.input_size[1:]
            try:
                self.fields = receptive_fields(search.model, self.nodes, size)
            except FeaturescopeError:  # a graph the analysis cannot follow: no patch boxes
                self.fields = {}

    def excited(self, outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``[{node, channels: [{channel, value, top: [{id, value, box}]}]}]``: the photo's
        :data:`UNITS_SHOWN` strongest channels at each node, and the gallery's top images of
        each (``box``: ``(top, left, bottom, right)`` in the model's input, or ``None``)."""
        answer = []
        for node in self.nodes:
            scores = channel_scores(outputs[node])
            top = self.units[node]
            if scores is None or len(scores) != top.values.shape[0]:
                continue
            order = torch.sort(-scores, stable=True).indices[:UNITS_SHOWN].tolist()
            field = self.fields.get(node)
            channels = []
            for c in order:
                shown = []
                for value, pos, (i, j) in zip(
                    top.values[c].tolist(),
                    top.image_ids[c].tolist(),
                    top.positions[c].tolist(),
                    strict=True,
                ):
                    if pos < 0:
                        continue
                    box = list(field.box(i, j)) if field is not None else None
                    shown.append({"id": self.ids[pos], "value": value, "box": box})
                channels.append({"channel": c, "value": float(scores[c]), "top": shown})
            answer.append({"node": node, "channels": channels})
        return answer
