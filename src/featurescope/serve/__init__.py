"""A local web app over any :class:`~featurescope.study.ImageSearch`: drop in a photo, see its
nearest gallery images, its feature maps, its Grad-CAM and the units it excites, and the whole
gallery on a 2-D map.

:func:`create_app` is an ASGI app factory (Starlette) for embedding in one's own service;
:func:`serve` runs it on uvicorn (``featurescope serve INDEX`` and
:meth:`ImageSearch.serve <featurescope.study.ImageSearch.serve>` call it). Both need the
``serve`` extra: ``pip install 'featurescope[serve]'``; importing this module does not.

Safe by default: it binds 127.0.0.1 and answers only loopback host names, uploads are limited
in bytes and in decoded pixels and never written to disk, gallery images are served by id only,
and every response carries a strict Content-Security-Policy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featurescope.errors import FeaturescopeError, FeaturescopeWarning
from featurescope.serve._units import GalleryImages
from featurescope.serve._upload import Limits

if TYPE_CHECKING:
    from featurescope.study import ImageSearch
    from featurescope.units import TopActivations

__all__ = [
    "GalleryImages",
    "Limits",
    "check_installed",
    "create_app",
    "is_loopback",
    "running",
    "serve",
]

_INSTALL = "pip install 'featurescope[serve]'"


def check_installed() -> None:
    """Raise a clear error when the ``serve`` extra (starlette, uvicorn) is not installed.

    Raises:
        FeaturescopeError: naming ``pip install 'featurescope[serve]'``.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FeaturescopeError(
            f"featurescope's web app needs starlette and uvicorn ({exc.name} is missing): "
            f"{_INSTALL}"
        ) from exc


def create_app(
    search: ImageSearch,
    *,
    k: int = 10,
    units: Mapping[str, TopActivations] | None = None,
    projection: str = "auto",
    limits: Limits | None = None,
    max_k: int = 100,
    allowed_hosts: Sequence[str] | None = ("127.0.0.1", "localhost", "[::1]", "::1"),
) -> Any:
    """An ASGI app (Starlette) that serves ``search`` to a browser and as a JSON API.

    The page is at ``/``; the API: ``POST /api/search?k=K`` and ``POST /api/analyse`` take a
    photo's bytes as the request's body (or ``{"path": "..."}`` as JSON, a file inside the
    gallery's folder), ``GET /api/gallery/ID`` an image's neighbours, ``GET /api/image/ID`` its
    picture, ``GET /api/map`` and ``/api/map.bin`` the gallery's 2-D map, ``GET /api/info``.
    Errors are JSON ``{"error": message}`` with a 4xx status.

    Args:
        search: the model and the gallery's index.
        k: neighbours shown by default.
        units: top activations over the gallery by node (from
            :func:`featurescope.units.top_activations` run over :class:`GalleryImages`), for the
            units a photo excites; ``None`` leaves that part out.
        projection: the gallery map's ``"auto"`` (UMAP when umap-learn is installed, else
            PCA), ``"pca"`` or ``"umap"``; computed at the first request for the map.
        limits: what an upload may be (default :class:`Limits`).
        max_k: the most neighbours a request may ask for.
        allowed_hosts: the ``Host`` names answered (default the loopback names, which refuses
            DNS-rebinding pages); ``None`` or ``["*"]`` answers any.

    Returns:
        A Starlette application: run it with any ASGI server.

    Raises:
        FeaturescopeError: the ``serve`` extra is not installed, or the index is empty.

    Example:
        >>> import tempfile, featurescope as fs
        >>> from featurescope.serve import create_app
        >>> root = fs.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=1,
        ...                                  val_per_class=0, test_per_class=0, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> app = create_app(search, k=3)
        >>> sorted(r.path for r in app.routes)[:3]
        ['/', '/api/analyse', '/api/gallery/{id:int}']
    """
    check_installed()
    from featurescope.serve._app import build_app
    from featurescope.serve._engine import Engine

    engine = Engine(search, units=units, projection=projection, limits=limits, max_k=max_k)
    return build_app(engine, default_k=k, allowed_hosts=allowed_hosts)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.1``, ``::1``, ``localhost``).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    # Listening now, so that a client told the URL before the server's loop starts waits in
    # the backlog instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False)
    return uvicorn.Server(config)


def serve(
    search: ImageSearch,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    **options: Any,
) -> None:
    """Serve ``search`` on uvicorn until interrupted (Ctrl-C).

    Args:
        search: the model and the gallery's index.
        host: the address to bind: 127.0.0.1 by default; any other (a LAN address,
            ``0.0.0.0``) exposes the gallery to other machines, with a warning.
        port: the port; 0 picks a free one.
        ready: called with the app's URL once it is bound (default: print it).
        log_level: uvicorn's.
        **options: passed to :func:`create_app` (``k``, ``units``, ``projection``,
            ``limits``, ``max_k``).

    Raises:
        FeaturescopeError: the ``serve`` extra is not installed.
        OSError: the address cannot be bound (the port is taken).
    """
    loopback = is_loopback(host)
    if not loopback:
        warnings.warn(
            f"serving on {host}, not 127.0.0.1: anyone who can reach this machine can search "
            "the gallery and see its images",
            FeaturescopeWarning,
            stacklevel=2,
        )
    if not loopback:  # the loopback names only would refuse every other machine's requests
        options.setdefault("allowed_hosts", None)
    app = create_app(search, **options)
    sock = _bind(host, port)
    with sock:
        (ready or _announce)(_url(sock, host))
        _server(app, log_level).run(sockets=[sock])


def _announce(url: str) -> None:
    print(f"featurescope serve: {url} (Ctrl-C to stop)", flush=True)


@contextlib.contextmanager
def running(
    app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0
) -> Iterator[str]:
    """Run an ASGI ``app`` on uvicorn in a background thread; yields its URL, stops on exit.

    For notebooks and tests: the app answers while the ``with`` block runs.

    Raises:
        FeaturescopeError: the server did not start within ``timeout`` seconds.

    Example:
        >>> import json, urllib.request, tempfile, featurescope as fs
        >>> from featurescope.serve import create_app, running
        >>> root = fs.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=1,
        ...                                  val_per_class=0, test_per_class=0, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> with running(create_app(search)) as url:
        ...     info = json.load(urllib.request.urlopen(url + "api/info"))
        >>> info["images"] == len(search.index)
        True
    """
    check_installed()
    sock = _bind(host, port)
    server = _server(app, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise FeaturescopeError(f"the app did not start on {host} within {timeout} s")
            time.sleep(0.02)
        yield _url(sock, host)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
