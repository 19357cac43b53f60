"""What the app computes, apart from HTTP: searches, a photo's maps and Grad-CAM, the gallery.

One :class:`Engine` per app. Index searches run concurrently (an
:class:`~featurescope.EmbeddingIndex` is safe to search from many threads); everything that runs
the model holds one lock, because a model's forward hooks and Grad-CAM's gradients are shared
state. Every method is blocking: the app calls them from worker threads, never on its event loop.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from featurescope._torch_utils import model_device, training_mode
from featurescope.errors import FeaturescopeError
from featurescope.pages import project_2d
from featurescope.serve import _maps
from featurescope.serve._projection import pack_points
from featurescope.serve._units import UnitsView
from featurescope.serve._upload import Limits, RequestError, decode_image
from featurescope.tap import FeatureTap, get_graph_node_names, grad_cam

if TYPE_CHECKING:
    from PIL import Image

    from featurescope.study import ImageSearch
    from featurescope.units import TopActivations

__all__ = ["Engine"]

#: Thumbnail sides a client may ask for (anything else is rounded to the nearest of these).
THUMB_SIDES = (64, 96, 160, 320)


class Engine:
    """The app's blocking work over one :class:`~featurescope.study.ImageSearch`.

    Args:
        search: the model and the gallery's index.
        units: each node's top activations over the gallery (``image_ids`` are positions in
            the index's order, as :func:`featurescope.serve.gallery_dataset` lists them).
        projection: ``"auto"``, ``"pca"`` or ``"umap"`` for the gallery's map.
        limits: what an upload may be.
        max_k: the most neighbours one request may ask for.
    """

    def __init__(
        self,
        search: ImageSearch,
        *,
        units: Mapping[str, TopActivations] | None = None,
        projection: str = "auto",
        limits: Limits | None = None,
        max_k: int = 100,
    ) -> None:
        from featurescope.zoo import model_metadata, model_name

        if len(search.index) == 0:
            raise FeaturescopeError("the search's index is empty: there is nothing to serve")
        self.search = search
        self.limits = limits or Limits()
        self.max_k = max(1, min(max_k, len(search.index)))
        self.projection_method = projection
        self._model_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._vectors: torch.Tensor | None = None
        self._map: tuple[str, bytes] | None = None
        ids = search.index.ids.tolist()
        self.ids: list[int] = ids
        self.rows = {gid: row for row, gid in enumerate(ids)}
        self.paths: list[str | None] = list(search.index.metadata)
        self.labels: list[int] = search.index.labels.tolist()
        meta = model_metadata(search.model)
        self.head_names = list(meta.class_names) if meta and meta.class_names else None
        self.architecture = model_name(search.model)
        names = [str(n) for n in get_graph_node_names(search.model)[1]]
        stages = list(meta.stage_nodes) if meta else []
        self.units = UnitsView(search, units or {}, self.rows)
        resolved = _maps.resolve_nodes(names, [*stages, *self.units.nodes, names[-1]])
        self.stage_nodes = stages
        self._aliases = {query: f"n{i}" for i, query in enumerate(dict.fromkeys(resolved))}
        self._tap_nodes = {resolved[q]: a for q, a in self._aliases.items()}
        # Two queries that resolve to one node share its alias.
        self._alias_of = {q: self._tap_nodes[resolved[q]] for q in resolved}
        self._output = self._alias_of[names[-1]]
        self._tap: FeatureTap | None = None

    # -- facts ----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the page shows before any search: the model, the gallery, the limits."""
        search = self.search
        return {
            "model": self.architecture,
            "node": search.node,
            "weights": search.weights,
            "images": len(search.index),
            "dim": search.index.dim,
            "metric": search.index.metric,
            "class_names": search.class_names or [],
            "stages": self.stage_nodes,
            "units": self.units.nodes,
            "max_k": self.max_k,
            "max_bytes": self.limits.max_bytes,
            "max_pixels": self.limits.max_pixels,
            "has_root": search.root is not None,
        }

    def class_name(self, label: int) -> str | None:
        names = self.search.class_names
        return names[label] if names is not None and 0 <= label < len(names) else None

    def entry(self, gid: int) -> dict[str, Any]:
        """One gallery image as the page lists it (no path: the page asks for it by id)."""
        row = self.rows[gid]
        path = self.paths[row]
        label = self.labels[row]
        return {
            "id": gid,
            "label": label,
            "class": self.class_name(label),
            "name": self.search.display_name(path) if path else f"#{gid}",
        }

    # -- searching ------------------------------------------------------------------------------

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise RequestError(422, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def neighbours(self, image: Image.Image, k: int, label: int | None) -> list[dict[str, Any]]:
        """The ``k`` nearest gallery images of ``image``, exactly as
        :meth:`ImageSearch.search_images <featurescope.study.ImageSearch.search_images>` finds
        them: its embedding (under the model's lock), then the shared index's search."""
        with self._model_lock:
            vector = self.search.embed_images([image])
        result = self.search.index.search(vector, self.check_k(k))
        return self._hits(result.distances[0], result.ids[0], label)

    def point(self, gid: int, k: int) -> dict[str, Any]:
        """A gallery image and its ``k`` nearest others (itself left out)."""
        if gid not in self.rows:
            raise RequestError(404, f"no gallery image has id {gid}")
        k = self.check_k(min(k, len(self.ids) - 1)) if len(self.ids) > 1 else 0
        hits: list[dict[str, Any]] = []
        if k:
            vector = self._gallery_vectors()[self.rows[gid]][None]
            result = self.search.index.search(vector, k, exclude_ids=[[gid]])
            hits = self._hits(result.distances[0], result.ids[0], self.labels[self.rows[gid]])
        return {**self.entry(gid), "neighbours": hits}

    def _hits(
        self, distances: torch.Tensor, ids: torch.Tensor, label: int | None
    ) -> list[dict[str, Any]]:
        out = []
        for rank, (d, gid) in enumerate(zip(distances.tolist(), ids.tolist(), strict=True)):
            if gid < 0:
                continue
            entry = self.entry(gid)
            hit = None if label is None or label < 0 else entry["label"] == label
            out.append({**entry, "rank": rank + 1, "distance": d, "hit": hit})
        return out

    def _gallery_vectors(self) -> torch.Tensor:
        with self._cache_lock:
            if self._vectors is None:
                self._vectors = self.search.index.vectors
            return self._vectors

    def gallery_map(self) -> tuple[str, bytes]:
        """``(method, packed points)`` of the whole gallery, computed once."""
        with self._cache_lock:
            if self._map is None:
                if self._vectors is None:
                    self._vectors = self.search.index.vectors
                method, xy = project_2d(self._vectors, self.projection_method)
                if self.ids and not -(2**31) <= min(self.ids) <= max(self.ids) < 2**31:
                    raise FeaturescopeError("the map sends ids as int32; these ids do not fit")
                self._map = (method, pack_points(torch.tensor(self.ids), xy))
            return self._map

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        """``image`` as the model's batch of one, under the model's lock: torch.fx's tracing
        (a tap or Grad-CAM built in another request) patches ``nn.Module.__call__`` process-wide,
        and torchvision's transforms are modules, which it would take for the model's own."""
        with self._model_lock:
            return self.search.preprocess([image])

    # -- one photo's insides --------------------------------------------------------------------

    def analyse(self, image: Image.Image) -> dict[str, Any]:
        """A photo's prediction, Grad-CAM, every stage's maps and the units it excites."""
        batch = self._preprocess(image)
        model = self.search.model
        device = model_device(model) or torch.device("cpu")
        with self._model_lock:
            if self._tap is None:
                self._tap = FeatureTap(model, self._tap_nodes)
            with training_mode(model, False), torch.inference_mode():
                out = self._tap(batch.to(device))
            logits = out[self._output]
            predicted = None
            if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] > 1:
                predicted = int(logits[0].argmax())
            cam, cam_node, cam_note = None, None, "the model has no classifier to explain"
            if predicted is not None:
                try:
                    found = grad_cam(model, batch.to(device), target=predicted)
                    cam, cam_node, cam_note = _maps.encode_cam(found.maps[0].cpu()), found.node, ""
                except FeaturescopeError as exc:
                    cam_note = f"no Grad-CAM for this model: {exc}"
        stages: list[dict[str, Any]] = []
        for stage in self.stage_nodes:
            maps = out[self._alias_of[stage]]
            if isinstance(maps, torch.Tensor) and maps.dim() == 4:
                one = _maps.channels_first(maps)[0].float().cpu()
                stages.append(_maps.encode_stage(stage, len(stages), one))
        units = self.units.excited({n: out[self._alias_of[n]] for n in self.units.nodes})
        return {
            "photo": _model_view(self.search, batch[0]),
            "input_size": list(batch.shape[-2:]),
            "predicted": self._prediction(logits, predicted),
            "cam": cam,
            "cam_side": _maps.CAM_SIDE,
            "cam_node": cam_node,
            "cam_note": cam_note,
            "stages": stages,
            "units": units,
        }

    def _prediction(self, logits: Any, predicted: int | None) -> dict[str, Any] | None:
        if predicted is None:
            return None
        probability = float(torch.softmax(logits[0].float(), dim=0)[predicted])
        names = self.head_names
        name = names[predicted] if names and predicted < len(names) else f"class {predicted}"
        return {"label": predicted, "name": name, "probability": probability}

    # -- images ---------------------------------------------------------------------------------

    def read_path(self, text: str) -> tuple[Image.Image, int | None]:
        """A photo named by a path inside the gallery's root, and its label when indexed.

        Raises:
            RequestError: 403 outside the root (or no root), 404 not a file, 413 too large.
        """
        root = self.search.root
        if root is None:
            raise RequestError(403, "this search records no gallery folder; upload the photo")
        base = os.path.realpath(root)
        real = os.path.realpath(os.path.join(base, text))
        if os.path.commonpath([real, base]) != base:
            raise RequestError(403, "that path is outside the gallery's folder")
        if not os.path.isfile(real):
            raise RequestError(404, "no image file at that path in the gallery's folder")
        if os.path.getsize(real) > self.limits.max_bytes:
            raise RequestError(413, _too_many_bytes(self.limits))
        with open(real, "rb") as fh:
            image = decode_image(fh.read(), self.limits)
        (gid,) = self.search.gallery_ids([real])
        return image, (self.labels[self.rows[gid]] if gid is not None else None)

    def gallery_image(self, gid: int, side: int, view: str) -> bytes:
        """A gallery image as JPEG: a thumbnail (``view="thumb"``) at most ``side`` pixels a
        side, or (``"model"``) the preprocessed crop as the model saw it, as PNG."""
        from featurescope.data.folders import load_rgb

        if gid not in self.rows:
            raise RequestError(404, f"no gallery image has id {gid}")
        path = self.paths[self.rows[gid]]
        try:
            picture = load_rgb(path) if path else None
        except (OSError, ValueError):
            picture = None
        if picture is None:
            raise RequestError(404, f"gallery image {gid}'s file is missing or unreadable")
        if view == "model":
            return _model_png(self.search, self._preprocess(picture)[0])
        side = min(THUMB_SIDES, key=lambda s: abs(s - side))
        picture.thumbnail((side, side))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


def _model_png(search: ImageSearch, tensor: torch.Tensor) -> bytes:
    """A preprocessed image as the model saw it (normalisation undone), as PNG bytes."""
    from PIL import Image as PILImage

    rgb = search.preprocessing.denormalize(tensor).clamp(0, 1)
    array = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _model_view(search: ImageSearch, tensor: torch.Tensor) -> str:
    """The photo as the model saw it, as a PNG ``data:`` URL: its maps line up with it."""
    import base64

    return "data:image/png;base64," + base64.b64encode(_model_png(search, tensor)).decode("ascii")


def _too_many_bytes(limits: Limits) -> str:
    return f"the upload is larger than {limits.max_bytes:,} bytes; send a smaller photo"
