"""Pretrained weights fetched and cached as torchvision and timm do it, against a real HTTP server.

A ``ThreadingHTTPServer`` on 127.0.0.1 serves real weight files (random weights of small
models, saved as their libraries save them) and counts the requests per path; the zoo entries
are pointed at it (torchvision's weights URL, timm's pretrained cfg, huggingface_hub's
endpoint). Nothing here reaches beyond 127.0.0.1: a guard refuses any other connection.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

import featurescope as fs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclasses.dataclass
class Route:
    """What the server answers on a path: a body, served whole or broken in a chosen way."""

    body: bytes
    mode: str = "ok"  # ok | truncate | drop | missing | stall
    etag: str | None = None  # the Hub's ETag; default: the body's SHA-256
    commit: str = COMMIT  # the Hub's X-Repo-Commit


class WeightsServer:
    """A loopback HTTP server with a route table and a request count per (method, path)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[tuple[str, str]] = collections.Counter()
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, **route: str) -> str:
        self.routes[path] = Route(body, **route)
        return self.root + path

    def requests(self, path: str | None = None) -> int:
        return sum(n for (_, p), n in self.hits.items() if path is None or p == path)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                server.hits[(self.command, self.path)] += 1
                route = server.routes.get(self.path)
                if route is None or route.mode == "missing":
                    self.send_response(404)
                    # What the Hub says of a file a repository lacks.
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", route.commit if route else COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.mode == "stall":
                    server.release.wait(30)
                    return
                body, start = route.body, 0
                ranged = self.headers.get("Range")
                if ranged:  # huggingface_hub resumes a cut transfer with "bytes=N-"
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("X-Repo-Commit", route.commit)
                self.send_header("ETag", f'"{route.etag or hashlib.sha256(body).hexdigest()}"')
                self.end_headers()
                if not send_body:
                    return
                if route.mode == "ok":
                    self.wfile.write(body[start:])
                    return
                # Cut at the same byte every time, as a broken proxy would.
                self.wfile.write(body[start : max(start, len(body) // 2)])
                self.wfile.flush()
                if route.mode == "drop":  # a reset, not a clean close
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True

        return Handler


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Refuse every connection beyond 127.0.0.1, whatever the code under test tries."""
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"a test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def server():
    s = WeightsServer()
    yield s
    s.close()


@pytest.fixture
def caches(tmp_path, monkeypatch, server):
    """Fresh torch and Hugging Face caches, huggingface_hub pointed at the server."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("FEATURESCOPE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these at import; timm's own loader reads them too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.root)
    template = server.root + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    # Where recent versions cache what they ask the endpoint about AI agents: not the user's.
    agents = str(tmp_path / "hf" / "agents.json")
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", agents, raising=False)
    return {"torch": tmp_path / "torch" / "hub" / "checkpoints", "hf": tmp_path / "hf" / "hub"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def _assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert ours.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


# --- torchvision: torch's hub cache -------------------------------------------------------------


@pytest.fixture(scope="module")
def squeezenet():
    """A real torchvision state dict (random weights), its file's bytes and torchvision's name."""
    state = torchvision.models.squeezenet1_1().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    body = buffer.getvalue()
    return state, body, f"squeezenet1_1-{hashlib.sha256(body).hexdigest()[:8]}.pth"


@pytest.fixture
def tv_url(monkeypatch, server, squeezenet):
    """Point squeezenet1_1's default weights at the server; returns a function to re-point."""
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.value

    def point(name: str, **route: str) -> str:
        url = server.serve(f"/models/{name}", squeezenet[1], **route)
        monkeypatch.setattr(weights, "url", url)
        return url

    return point


def test_torchvision_weights_fetched_once_then_read_from_the_cache(
    caches, server, squeezenet, tv_url, capsys
):
    state, body, name = squeezenet
    url = tv_url(name)
    model = fs.create_model("squeezenet1_1", pretrained=True)
    _assert_same_weights(model, state)
    assert (caches["torch"] / name).read_bytes() == body
    assert server.requests() == 1
    err = capsys.readouterr().err
    assert f"Downloading {url}" in err and "\r" not in err
    assert f"{name}: {len(body)}/{len(body)} B (100%)" in err  # plain progress lines
    fs.create_model("squeezenet1_1", pretrained=True)
    assert fs.zoo.fetch_weights("squeezenet1_1") == caches["torch"] / name
    # torchvision's own loader reads the file featurescope fetched: no request.
    theirs = torchvision.models.get_model("squeezenet1_1", weights="DEFAULT")
    _assert_same_weights(theirs, state)
    assert server.requests() == 1


def test_a_file_torch_hub_fetched_is_used_without_a_request(caches, server, squeezenet, tv_url):
    state, _, name = squeezenet
    url = tv_url(name)
    torch.hub.load_state_dict_from_url(url, check_hash=True, progress=False)
    assert server.requests() == 1
    assert fs.zoo.fetch_weights("squeezenet1_1", "IMAGENET1K_V1") == caches["torch"] / name
    _assert_same_weights(fs.create_model("squeezenet1_1", pretrained=True), state)
    assert server.requests() == 1


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("wrong hash", "invalid hash"),
        ("truncate", "stopped after"),
        ("drop", ""),
        ("missing", "404"),
    ],
)
def test_a_failed_torchvision_download_raises_and_leaves_nothing(
    caches, server, squeezenet, tv_url, mode, cause
):
    name = "squeezenet1_1-00000000.pth" if mode == "wrong hash" else squeezenet[2]
    url = tv_url(name, mode="ok" if mode == "wrong hash" else mode)
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.create_model("squeezenet1_1", pretrained=True)
    assert info.value.__cause__ is not None and cause in str(info.value.__cause__)
    assert name in str(info.value) and url in str(info.value)
    assert str(caches["torch"]) in str(info.value)
    assert _files(caches["torch"]) == []
    assert server.requests() == 1


def test_no_route_and_timeout_raise_with_the_cause(caches, server, squeezenet, tv_url, monkeypatch):
    from featurescope.zoo import _download

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.value
    monkeypatch.setattr(weights, "url", f"http://127.0.0.1:{port}/models/{squeezenet[2]}")
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.zoo.fetch_weights("squeezenet1_1")
    assert isinstance(info.value.__cause__, OSError)
    tv_url(squeezenet[2], mode="stall")
    monkeypatch.setattr(_download, "TIMEOUT", 0.2)
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.zoo.fetch_weights("squeezenet1_1")
    assert "timed out" in str(info.value.__cause__)
    assert _files(caches["torch"]) == []


@pytest.mark.parametrize("variable", ["FEATURESCOPE_OFFLINE", "HF_HUB_OFFLINE"])
def test_torchvision_offline_makes_no_request(
    caches, server, squeezenet, tv_url, monkeypatch, variable
):
    url = tv_url(squeezenet[2])
    monkeypatch.setenv(variable, "1")
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.create_model("squeezenet1_1", pretrained=True)
    message = str(info.value)
    assert squeezenet[2] in message and url in message and str(caches["torch"]) in message
    assert server.requests() == 0


# --- timm: Hugging Face's hub cache, and torch's for URL-only weights ---------------------------

timm = pytest.importorskip(
    "timm", reason="timm is not installed (pip install 'featurescope[timm]')"
)


@pytest.fixture(scope="module")
def tiny_timm():
    """A small timm model with pretrained weights on the Hub: random weights in its file formats."""
    from safetensors.torch import save

    arch = next(n for n in ("test_resnet", "resnet10t") if timm.is_model(n))
    cfg = timm.models.get_pretrained_cfg(arch)
    state = timm.create_model(arch).state_dict()
    pickled = io.BytesIO()
    torch.save(state, pickled)
    return arch, cfg, state, save(state), pickled.getvalue()


def _hub_path(cfg, filename: str) -> str:
    return f"/{cfg.hf_hub_id}/resolve/main/{filename}"


def test_timm_hub_weights_fetched_once_then_read_from_the_cache(caches, server, tiny_timm):
    from huggingface_hub import constants

    arch, cfg, state, safetensors_body, _ = tiny_timm
    path = _hub_path(cfg, "model.safetensors")
    server.serve(path, safetensors_body)
    model = fs.create_model(f"timm/{arch}", pretrained=True)
    _assert_same_weights(model, state)
    fetched = fs.zoo.fetch_weights(f"timm/{arch}")
    repo = caches["hf"] / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    assert fetched == repo / "snapshots" / COMMIT / "model.safetensors"
    assert fetched.read_bytes() == safetensors_body
    # huggingface_hub may ask its endpoint other things (its agent registry): count the file's.
    assert server.hits[("HEAD", path)] == server.hits[("GET", path)] == 1
    assert server.requests(path) == 2
    # timm's own loader reads the file featurescope fetched, offline.
    constants.HF_HUB_OFFLINE = True  # restored by the caches fixture
    _assert_same_weights(timm.create_model(arch, pretrained=True), state)
    assert server.requests(path) == 2


def test_a_file_hf_hub_download_fetched_is_used_without_a_request(caches, server, tiny_timm):
    from huggingface_hub import hf_hub_download

    arch, cfg, state, safetensors_body, _ = tiny_timm
    server.serve(_hub_path(cfg, "model.safetensors"), safetensors_body)
    theirs = hf_hub_download(cfg.hf_hub_id, "model.safetensors")
    requests = server.requests()
    assert fs.zoo.fetch_weights(f"timm/{arch}") == Path(theirs)
    _assert_same_weights(fs.create_model(f"timm/{arch}", pretrained=True), state)
    assert server.requests() == requests


def test_timm_takes_pytorch_model_bin_where_the_repository_has_no_safetensors(
    caches, server, tiny_timm
):
    arch, cfg, state, _, pickled_body = tiny_timm
    server.serve(_hub_path(cfg, "pytorch_model.bin"), pickled_body)
    fetched = fs.zoo.fetch_weights(f"timm/{arch}")
    assert fetched.name == "pytorch_model.bin" and fetched.read_bytes() == pickled_body
    assert server.requests(_hub_path(cfg, "model.safetensors")) == 1  # asked first, as timm does
    _assert_same_weights(fs.create_model(f"timm/{arch}", pretrained=True), state)


@pytest.mark.parametrize(
    ("mode", "cause"),
    [("wrong hash", "invalid hash"), ("truncate", ""), ("drop", ""), ("missing", "404")],
)
def test_a_failed_hub_download_raises_and_leaves_nothing(
    caches, server, tiny_timm, monkeypatch, mode, cause
):
    import huggingface_hub.file_download

    # huggingface_hub waits a second before each of its resumptions of a cut transfer.
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    arch, cfg, _, body, _ = tiny_timm
    path = _hub_path(cfg, "model.safetensors")
    etag = hashlib.sha256(b"other").hexdigest() if mode == "wrong hash" else None
    server.serve(path, body, mode="ok" if mode == "wrong hash" else mode, etag=etag)
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.zoo.fetch_weights(f"timm/{arch}")
    assert info.value.__cause__ is not None and cause in str(info.value.__cause__)
    assert cfg.hf_hub_id in str(info.value) and "model.safetensors" in str(info.value)
    assert _files(caches["hf"]) == []
    assert server.requests(path) >= 1


def test_a_failed_hub_download_keeps_what_the_cache_held_before(
    caches, server, tiny_timm, monkeypatch
):
    import huggingface_hub.file_download
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    arch, cfg, _, body, _ = tiny_timm
    older = "f" * 40
    server.serve(_hub_path(cfg, "config.json"), b"{}", commit=older)
    config = hf_hub_download(cfg.hf_hub_id, "config.json")
    before = {p: p.read_bytes() for p in _files(caches["hf"])}
    # The new commit is recorded before the transfer; the failure must put the old one back.
    server.serve(_hub_path(cfg, "model.safetensors"), body, mode="truncate")
    with pytest.raises(fs.errors.WeightsUnavailableError):
        fs.zoo.fetch_weights(f"timm/{arch}")
    assert {p: p.read_bytes() for p in _files(caches["hf"])} == before
    assert try_to_load_from_cache(cfg.hf_hub_id, "config.json") == config


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_an_interrupted_torchvision_download_leaves_nothing(
    caches, server, squeezenet, tv_url, monkeypatch
):
    from featurescope.zoo import _download

    tv_url(squeezenet[2])
    monkeypatch.setattr(_download.Progress, "update", _interrupt)  # Ctrl-C mid-transfer
    with pytest.raises(KeyboardInterrupt):
        fs.zoo.fetch_weights("squeezenet1_1")
    assert _files(caches["torch"]) == []


def test_an_interrupted_hub_download_leaves_nothing(caches, server, tiny_timm, monkeypatch):
    from featurescope.zoo import _download

    arch, cfg, _, body, _ = tiny_timm
    server.serve(_hub_path(cfg, "model.safetensors"), body)
    monkeypatch.setattr(_download.Progress, "update", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        fs.zoo.fetch_weights(f"timm/{arch}")
    assert _files(caches["hf"]) == []


@pytest.mark.parametrize("variable", ["FEATURESCOPE_OFFLINE", "HF_HUB_OFFLINE"])
def test_timm_offline_makes_no_request(caches, server, tiny_timm, monkeypatch, variable):
    arch, cfg, _, body, _ = tiny_timm
    server.serve(_hub_path(cfg, "model.safetensors"), body)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.create_model(f"timm/{arch}", pretrained=True)
    assert cfg.hf_hub_id in str(info.value) and "model.safetensors" in str(info.value)
    assert str(caches["hf"]) in str(info.value)
    assert server.requests() == 0


@pytest.fixture
def timm_url(monkeypatch, server, tiny_timm):
    """Make the tiny model's weights URL-only (no Hub id), served from the server."""
    from timm.models import _registry

    arch, cfg, _, _, body = tiny_timm
    name = f"{arch}-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    url = server.serve(f"/timm/{name}", body)
    url_only = dataclasses.replace(cfg, hf_hub_id=None, url=url)
    for key in (arch, f"{arch}.{cfg.tag}"):  # timm registers the default tag under both
        monkeypatch.setitem(_registry._model_pretrained_cfgs, key, url_only)
    return name


def test_timm_url_weights_go_to_torch_hub_cache(caches, server, tiny_timm, timm_url):
    arch, _, state, _, body = tiny_timm
    _assert_same_weights(fs.create_model(f"timm/{arch}", pretrained=True), state)
    assert (caches["torch"] / timm_url).read_bytes() == body
    assert fs.zoo.fetch_weights(f"timm/{arch}") == caches["torch"] / timm_url
    # timm's own loader reads it from torch's hub cache without a request.
    _assert_same_weights(timm.create_model(arch, pretrained=True), state)
    assert server.requests() == 1
    assert _files(caches["hf"]) == []


@pytest.mark.parametrize("mode", ["truncate", "missing"])
def test_a_failed_timm_url_download_leaves_nothing(caches, server, tiny_timm, timm_url, mode):
    server.routes[f"/timm/{timm_url}"].mode = mode
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.zoo.fetch_weights(f"timm/{tiny_timm[0]}")
    assert info.value.__cause__ is not None and timm_url in str(info.value)
    assert _files(caches["torch"]) == []


def test_timm_url_offline_makes_no_request(caches, server, tiny_timm, timm_url, monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_OFFLINE", "1")
    with pytest.raises(fs.errors.WeightsUnavailableError, match=timm_url):
        fs.zoo.fetch_weights(f"timm/{tiny_timm[0]}")
    assert server.requests() == 0


# --- featurescope weights fetch ------------------------------------------------------------------


def test_cli_weights_fetch_prints_where_each_file_went(caches, server, squeezenet, tv_url, capsys):
    from featurescope.cli import main

    tv_url(squeezenet[2])
    assert main(["weights", "fetch", "squeezenet1_1", "--weights", "IMAGENET1K_V1"]) == 0
    assert capsys.readouterr().out == f"squeezenet1_1: {caches['torch'] / squeezenet[2]}\n"
    assert main(["weights", "fetch", "squeezenet1_1"]) == 0  # cached: no second request
    assert server.requests() == 1


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["squeezenet1_1", "resnet19"], "unknown model 'resnet19'"),
        (["alexnet"], "model 'alexnet' has no pretrained weights to fetch"),
    ],
)
def test_cli_weights_fetch_refuses_in_one_line_before_downloading(
    caches, server, squeezenet, tv_url, capsys, names, message
):
    from featurescope.cli import main

    tv_url(squeezenet[2])
    assert main(["weights", "fetch", *names]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert server.requests() == 0
