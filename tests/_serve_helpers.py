"""What the serve tests share: a tiny gallery, its search and units, and a plain HTTP client.

The app runs as a real uvicorn server on a free loopback port (``featurescope.serve.running``);
requests go through :mod:`http.client`, so each test controls its headers and body exactly.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import featurescope as fs
from featurescope.serve import GalleryImages
from featurescope.units import top_activations

UNIT_NODE = "conv2"


def tiny_search(root: Path) -> tuple[Any, Path, dict[str, Any]]:
    """``(search, test folder, units)`` over a synthetic gallery of 15 images."""
    data = fs.make_synthetic_dataset(
        root, train_per_class=3, val_per_class=0, test_per_class=1, size=48
    )
    search = fs.ImageSearch.build(fs.create_model("alexnet_half"), data, progress=False)
    units = top_activations(search.model, GalleryImages(search), [UNIT_NODE], k=3)
    return search, data / "test", units


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers with lower-case names, body)`` of one request to the app at ``url``.

    A ``body`` that is an iterable of chunks is sent chunked, without a ``Content-Length``.
    """
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


def post_json(url: str, path: str, body: bytes, kind: str = "image/png") -> tuple[int, Any]:
    status, _, raw = call(url, "POST", path, body, {"content-type": kind})
    return status, json.loads(raw)
