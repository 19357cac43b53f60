"""The app under load, and as the command line starts it: both real servers on loopback.

The load test sends 200 searches from 8 concurrent clients (a bounded count, each request with a
timeout) and checks every answer against ``search_images``' for its photo: the one index is
shared and the model runs under a lock, so concurrency must not mix answers up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import featurescope as fs
from _serve_helpers import call, post_json, tiny_search
from featurescope.serve import create_app, running

pytestmark = pytest.mark.slow
pytest.importorskip("starlette", reason="the serve extra is not installed")

REQUESTS, CLIENTS = 200, 8


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    search, test, _ = tiny_search(tmp_path_factory.mktemp("serve-load") / "data")
    return search, fs.ImageFolder(test)


def test_200_searches_from_8_clients_each_get_their_own_answer(gallery):
    search, test = gallery
    photos = [Path(p).read_bytes() for p in test.paths]
    expected = {
        (i, k): search.search_images([p], k=k).ids[0].tolist()
        for i, p in enumerate(test.paths)
        for k in (1, 3, 5)
    }
    jobs = [(n % len(photos), (1, 3, 5)[n % 3]) for n in range(REQUESTS)]
    with running(create_app(search)) as url:

        def one(job):
            photo, k = job
            return post_json(url, f"/api/search?k={k}", photos[photo])

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(one, jobs))
        assert call(url, "GET", "/api/info")[0] == 200  # still serving
    assert len(answers) == REQUESTS
    for job, (status, answer) in zip(jobs, answers, strict=True):
        assert status == 200, answer
        assert [h["id"] for h in answer["neighbours"]] == expected[job]


def test_the_command_line_serves_prints_its_url_and_stops_on_ctrl_c(gallery, tmp_path):
    search, _ = gallery
    saved = search.save(tmp_path / "tiny.fsindex")
    script = (
        "import sys; import featurescope; "
        "assert 'starlette' not in sys.modules and 'featurescope.serve' not in sys.modules; "
        "from featurescope.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", str(saved), "--port", "0", "-k", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        while not any(line.startswith("featurescope serve: http://") for line in lines):
            line = process.stdout.readline()
            assert line, f"exited early: {process.stderr.read()}"
            lines.append(line)
        url = lines[-1].split()[2]
        assert url.startswith("http://127.0.0.1:")
        status, _, raw = call(url, "GET", "/api/info")
        assert status == 200 and json.loads(raw)["images"] == len(search.index)
        assert "Random weights" in "".join(lines)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 0
