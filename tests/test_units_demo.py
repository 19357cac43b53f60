"""The demo's fourth experiment: what the channels at each stage respond to, and its report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import featurescope as fs
from featurescope.pages import render
from featurescope.study._experiments import channel_units
from featurescope.study.report import _Figures, _units_section
from featurescope.units import top_activations


def test_channel_units_writes_each_stage_and_what_the_report_shows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = fs.create_model("alexnet_half").eval()
    images = TensorDataset(torch.rand(4, 3, 227, 227))
    done = channel_units(
        model, images, tmp_path / "units", stages=["conv1", "conv2"], k=3, shown_channels=2,
        progress=False,
    )  # fmt: skip
    assert done["figures"] == {"conv1": "units/conv1.png", "conv2": "units/conv2.png"}
    assert (done["num_images"], done["k"], done["projection"]) == (4, 3, "deconvnet")
    units = json.loads((tmp_path / done["units"]).read_text())
    top = top_activations(model, images, ["conv1", "conv2"], k=3)
    for node in units["nodes"]:
        expected = top[node["node"]]
        ids = [[t["image_id"] for t in c["top"]] for c in node["channels"]]
        assert ids == expected.image_ids.tolist()
        strongest = set(torch.argsort(-expected.values[:, 0], stable=True)[:2].tolist())
        with_files = {c["channel"] for c in node["channels"] if c["top"][0]["patch"]}
        assert with_files == strongest
        for c in node["channels"]:
            for t in c["top"]:
                for name in (t["patch"], t["projection"]):
                    assert name is None or (tmp_path / "units" / name).is_file()

    section = _units_section(_Figures(tmp_path), {**done, "shown_channels": 2})
    links = _Links()
    links.feed(render(f"report/{section['template']}", section=section))
    assert "What do the channels respond to?" in links.text
    assert set(done["figures"].values()) <= links.srcs
    assert "units/units.json" in links.hrefs


class _Links(HTMLParser):
    """The images, links and text of a page, read by a real HTML parser."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: set[str] = set()
        self.hrefs: set[str] = set()
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img" and found.get("src"):
            self.srcs.add(str(found["src"]))
        if tag == "a" and found.get("href"):
            self.hrefs.add(str(found["href"]))

    def handle_data(self, data: str) -> None:
        self.text += data
