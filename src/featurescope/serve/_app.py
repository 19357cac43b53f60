"""The Starlette app: routes, the upload's byte limit, JSON errors and the security headers.

Blocking work (decoding, the model, the index) runs in Starlette's worker threads through
:func:`starlette.concurrency.run_in_threadpool`, so one slow photo never stalls the page's other
requests; the :class:`~featurescope.serve._engine.Engine` serialises the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from featurescope.errors import FeaturescopeError
from featurescope.pages import stylesheet_path
from featurescope.serve._engine import Engine
from featurescope.serve._upload import RequestError, decode_image

__all__ = ["CSP", "LOOPBACK_HOSTS", "build_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Every response's Content-Security-Policy: the page's own script and stylesheet files, images
#: from the app and inline ``data:`` (the photo as the model saw it), requests to the app only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: Host headers a loopback server answers: a page elsewhere that rebinds its DNS name to
#: 127.0.0.1 sends its own name, and is refused.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
#: The files the page loads: its script, and the one stylesheet every featurescope page shares.
_SCRIPT = "serve.js"
_STYLESHEET = "featurescope.css"


class SecurityHeaders:
    """ASGI middleware adding :data:`CSP` and its companions to every response, errors too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in _HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message["headers"] = kept + _HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes: by its declared length before
    reading, and by counting as it streams in (a missing or false length does not help)."""
    declared = request.headers.get("content-length")
    too_large = f"the upload is larger than {limit:,} bytes; send a smaller photo"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise RequestError(413, too_large)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _int_param(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise RequestError(422, f"{name} must be a whole number, got {text!r}") from None


def build_app(
    engine: Engine,
    *,
    default_k: int = 10,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    title: str = "featurescope",
) -> Starlette:
    """The ASGI app over ``engine`` (see :func:`featurescope.serve.create_app`)."""
    page = _page(title=title, info=engine.info(), default_k=min(default_k, engine.max_k))
    static = _static_files()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])
        if found is None:
            raise RequestError(404, "no such file")
        return Response(found[0], media_type=found[1], headers={"cache-control": "no-cache"})

    async def info(request: Request) -> Response:
        return JSONResponse(engine.info())

    async def photo(request: Request) -> tuple[Any, int | None]:
        """The request's photo: its body's bytes, or ``{"path": ...}`` inside the gallery."""
        body = await _read_body(request, engine.limits.max_bytes)
        label = request.query_params.get("label")
        given = _label(engine, label)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                text = json.loads(body)["path"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise RequestError(422, 'a JSON request must be {"path": "..."}') from None
            image, own = await run_in_threadpool(engine.read_path, text)
            return image, given if given is not None else own
        image = await run_in_threadpool(decode_image, body, engine.limits)
        return image, given

    async def search(request: Request) -> Response:
        k = _int_param(request, "k", min(default_k, engine.max_k))
        engine.check_k(k)
        image, label = await photo(request)
        hits = await run_in_threadpool(engine.neighbours, image, k, label)
        return JSONResponse({"k": k, "label": label, "neighbours": hits})

    async def analyse(request: Request) -> Response:
        image, _ = await photo(request)
        return JSONResponse(await run_in_threadpool(engine.analyse, image))

    async def gallery_entry(request: Request) -> Response:
        k = _int_param(request, "k", min(default_k, engine.max_k))
        answer = await run_in_threadpool(engine.point, request.path_params["id"], k)
        return JSONResponse(answer)

    async def gallery_image(request: Request) -> Response:
        view = request.query_params.get("view", "thumb")
        if view not in ("thumb", "model"):
            raise RequestError(422, "view must be 'thumb' or 'model'")
        side = _int_param(request, "size", 160)
        data = await run_in_threadpool(engine.gallery_image, request.path_params["id"], side, view)
        kind = "image/png" if view == "model" else "image/jpeg"
        return Response(data, media_type=kind, headers={"cache-control": "private, max-age=600"})

    async def gallery_map(request: Request) -> Response:
        method, _ = await run_in_threadpool(engine.gallery_map)
        return JSONResponse({"method": method, "count": len(engine.ids)})

    async def gallery_map_points(request: Request) -> Response:
        _, packed = await run_in_threadpool(engine.gallery_map)
        return Response(packed, media_type="application/octet-stream")

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _problem(exc.status, str(exc))

    async def failed(request: Request, exc: Exception) -> Response:
        # An expected failure of the library (a model that cannot take this input): the user
        # reads why; anything else stays a 500 with its traceback in the server's log.
        return _problem(422, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _problem(exc.status_code, str(exc.detail))

    routes = [
        Route("/", index),
        Route("/static/{name}", static_file),
        Route("/api/info", info),
        Route("/api/search", search, methods=["POST"]),
        Route("/api/analyse", analyse, methods=["POST"]),
        Route("/api/gallery/{id:int}", gallery_entry),
        Route("/api/image/{id:int}", gallery_image),
        Route("/api/map", gallery_map),
        Route("/api/map.bin", gallery_map_points),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None and "*" not in allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    handlers: Any = {
        RequestError: refused,
        FeaturescopeError: failed,
        HTTPException: http_error,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


def _page(**context: Any) -> str:
    """The app's page: its own template over pages' base template, so the app, the explorer and
    the report share one skeleton and one stylesheet."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [
                jinja2.PackageLoader("featurescope.serve", "templates"),
                jinja2.PackageLoader("featurescope.pages", "templates"),
            ]
        ),
        autoescape=True,  # every template is HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template("index.html").render(**context)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Each file under /static/: its bytes and media type, read once when the app is built."""
    script = resources.files("featurescope.serve").joinpath("static").joinpath(_SCRIPT)
    return {
        _SCRIPT: (script.read_bytes(), "text/javascript; charset=utf-8"),
        _STYLESHEET: (stylesheet_path().read_bytes(), "text/css; charset=utf-8"),
    }


def _label(engine: Engine, text: str | None) -> int | None:
    """The query's class, named by the page (a class name, or its index) to mark hits."""
    if text is None or text == "":
        return None
    names = engine.search.class_names or []
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit():
        return int(text)
    raise RequestError(422, f"label {text!r} is not one of the gallery's classes")
