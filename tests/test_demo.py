"""The study end to end: the three experiments, `featurescope demo` and its report."""

from __future__ import annotations

import html.parser
import io
import json
from pathlib import Path

import pytest
import torch

import featurescope as fs
from featurescope import study
from featurescope._progress import PLAIN_ENV, Progress
from featurescope.data import load_image_folders
from featurescope.study.demo import run_demo


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, tiny_data, tiny_preset) -> tuple[Path, dict]:
    """The demo as a user runs it, ``featurescope demo``, once for every test of this module."""
    from featurescope.cli import main
    from featurescope.train.presets import PRESETS

    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--data", str(tiny_data), "--preset", "tiny", "--out", str(out), "--quiet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny", tiny_preset)
        assert main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text(encoding="utf-8"))


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)


def test_demo_writes_every_file(demo_out):
    out, metrics = demo_out
    expected = [
        "report.html",
        "explorer.html",
        "metrics.json",
        "accuracy.csv",
        "width_curves.png",
        "retrieval_montage.png",
        "maps/overlay.png",
        "similarity/alexnet_vs_alexnet_half/similarity.png",
        "similarity/alexnet_vs_alexnet_half/index.html",
    ] + [
        f"maps/{stage}_{kind}.png"
        for stage in ("conv1", "conv2", "conv3")
        for kind in ("grid", "sum")
    ]
    for name in expected:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # Both runs are shown: each keeps its best weights and history, no resume state.
    for run in ("alexnet-bs5", "alexnet_half-bs5"):
        kept = sorted(p.name for p in (out / "checkpoints" / run).iterdir())
        assert kept == ["best.safetensors", "history.json"]


def test_a_finished_demo_leaves_one_copy_of_the_weights_it_shows(demo_out):
    out, _ = demo_out
    weights = sum(
        sum(t.numel() * t.element_size() for t in fs.create_model(name).state_dict().values())
        for name in ("alexnet", "alexnet_half")
    )
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert not list(out.rglob("resume.pt"))
    # The two models' weights once, and a few MB of figures, pages and JSON.
    assert weights < written < weights + 20e6


def test_demo_compares_the_widths_stage_by_stage(demo_out):
    out, metrics = demo_out
    similarity = metrics["similarity"]
    assert similarity["stages"] == ["conv1", "conv2", "conv3", "fc"]
    names = [c["name"] for c in similarity["comparisons"]]
    assert names == [
        "alexnet vs alexnet_half",
        "alexnet vs alexnet",
        "alexnet_half vs alexnet_half",
    ]
    for comparison in similarity["comparisons"][1:]:  # each width with itself: a unit diagonal
        diagonal = torch.tensor(comparison["matrix"]).diagonal()
        torch.testing.assert_close(diagonal, torch.ones(4, dtype=diagonal.dtype))
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Do the two widths learn the same representations?" in report
    assert "similarity/alexnet_vs_alexnet_half/similarity.png" in report


def test_report_links_only_files_that_exist(demo_out):
    out, _ = demo_out
    parser = _Links()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(parser.targets) >= 10
    for target in parser.targets:
        assert (out / target).is_file(), target


def test_demo_metrics_describe_the_three_experiments(demo_out, tiny_data):
    _, metrics = demo_out
    runs = metrics["width_comparison"]["runs"]
    assert [r["run"] for r in runs] == ["alexnet bs5", "alexnet_half bs5"]
    assert metrics["feature_maps"]["shapes"] == {
        "conv1": [96, 27, 27],
        "conv2": [256, 13, 13],
        "conv3": [256, 6, 6],
        "fc": [5],
    }
    retrieval = metrics["retrieval"]
    assert retrieval["gallery_size"] == 10  # 2 training images per class
    assert retrieval["k"] == 10
    accuracy = (Path(demo_out[0]) / "accuracy.csv").read_text().splitlines()
    assert accuracy[0].startswith("run,model,parameters,batch_size")
    assert len(accuracy) == 3


def test_demo_retrieval_scores_recomputed(demo_out, tiny_data):
    """The report's precision is what the saved model's embeddings give, computed afresh."""
    out, metrics = demo_out
    splits = load_image_folders(tiny_data)
    run_dir = out / "checkpoints" / "alexnet-bs5"
    best = run_dir / "best.safetensors"
    model = fs.zoo.load_checkpoint(best if best.exists() else run_dir / "last.safetensors")
    gallery = study.embed(model, splits.train, progress=False)
    queries = study.embed(model, splits.test, progress=False)
    index = fs.EmbeddingIndex(2048)
    index.add(gallery["embedding"], labels=gallery.labels)
    expected = fs.index.retrieval_metrics(index, queries["embedding"], queries.labels, k=10)
    assert metrics["retrieval"]["trained"] == pytest.approx(expected)
    assert metrics["retrieval"]["num_queries"] == len(splits.test)


def test_demo_reuses_finished_training_and_prints_a_summary(
    demo_out, tiny_data, tiny_preset, capsys
):
    out, first = demo_out
    again = run_demo(out, data=tiny_data, preset=tiny_preset, progress=True)
    assert again["width_comparison"]["runs"] == first["width_comparison"]["runs"]
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err  # not a terminal: plain lines only
    table = printed.out[printed.out.index("run ") :].splitlines()
    assert [line.split()[0] + " " + line.split()[1] for line in table[1:3]] == [
        "alexnet bs5",
        "alexnet_half bs5",
    ]
    assert f"{again['retrieval']['trained']['precision_at_k']:.3f}" in printed.out
    assert "epoch 1/1" not in printed.out + printed.err  # both runs reused, not trained again
    assert f"MB to {out}: " in printed.out.splitlines()[-1]


def test_demo_explorer_shows_the_retrieval_the_metrics_score(demo_out):
    """The explorer's neighbours are the demo index's answer for each test image."""
    import re

    from featurescope.pages import read_explorer_data

    out, metrics = demo_out
    page = (out / "explorer.html").read_text(encoding="utf-8")
    data = read_explorer_data(out / "explorer.html")
    assert [r["name"] for r in data["runs"]] == ["alexnet bs5", "alexnet_half bs5"]
    assert len(data["queries"]) == metrics["retrieval"]["num_queries"]
    assert (
        data["metrics"]["trained"]["precision@k"]
        == metrics["retrieval"]["trained"]["precision_at_k"]
    )
    model = study.WidthRun(
        "alexnet bs5", "alexnet", 5, fs.train.History(), out / "checkpoints" / "alexnet-bs5"
    ).load_best()
    splits = load_image_folders(metrics["data"]["root"])
    index = study.index_embeddings(study.embed(model, splits.train, progress=False))
    queries = study.embed(model, splits.test, progress=False)
    expected = index.search(queries["embedding"], metrics["retrieval"]["k"])
    shown = [[i for i, _ in q["neighbours"]] for q in data["queries"]]
    assert shown == expected.ids.tolist()
    assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:|//)", page)  # nothing remote
    assert "default-src 'none'" in page  # and the browser is told to fetch nothing
    assert (out / "explorer.html").stat().st_size < 20 * 2**20
    assert "explorer.html" in (out / "report.html").read_text(encoding="utf-8")


def test_demo_explorer_units_are_the_channels_units_json_ranks(demo_out):
    """The explorer's Units section shows each stage's strongest channels with the very top
    images the fourth experiment ranked (the same files, in the same order)."""
    from featurescope.pages import read_explorer_data

    out, metrics = demo_out
    units = read_explorer_data(out / "explorer.html")["units"]
    ranked = json.loads((out / metrics["units"]["units"]).read_text(encoding="utf-8"))
    assert [s["name"] for s in units["stages"]] == [n["node"] for n in ranked["nodes"]]
    for stage, node in zip(units["stages"], ranked["nodes"], strict=True):
        assert 0 < len(stage["units"]) <= 32 and stage["channels"] == len(node["channels"])
        for unit in stage["units"]:
            top = node["channels"][unit["channel"]]["top"]
            shown = [Path(units["sources"][e["source"]]["name"]).name for e in unit["top"]]
            assert shown == [Path(t["file"]).name for t in top]
            assert unit["top"][0]["deconvnet"] is not None


# --- progress output -------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_one_line_per_tenth_without_carriage_returns():
    log = io.StringIO()
    with Progress(1000, "extract", unit="img", stream=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" in ")[0] for line in lines] == [
        f"extract: {n}/1000 img ({n // 10}%)" for n in range(100, 1001, 100)
    ]


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    monkeypatch.delenv(PLAIN_ENV, raising=False)
    tty = _Terminal()
    with Progress(50, "extract", stream=tty) as bar:
        bar.update(50)
    assert "\r" in tty.getvalue()
    monkeypatch.setenv(PLAIN_ENV, "1")
    forced = _Terminal()
    with Progress(50, "extract", stream=forced) as bar:
        bar.update(50)
    assert "\r" not in forced.getvalue() and forced.getvalue().startswith(
        "extract: 50/50 it (100%)"
    )


@pytest.mark.slow
def test_training_logs_one_plain_line_per_epoch(tiny_data, capsys):
    splits = load_image_folders(tiny_data)
    model = fs.create_model("alexnet_half", num_classes=len(splits.classes))
    fs.train.train(
        model,
        splits.train,
        splits.val,
        epochs=3,
        batch_size=5,
        optimizer="adam",
        lr_schedule={1: 1e-4},
        progress=True,
    )
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("alexnet_half epoch")]
    assert [line.split(":")[0] for line in lines] == [
        f"alexnet_half epoch {e}/3" for e in (1, 2, 3)
    ]
    assert all("val_acc=" in line for line in lines)


def test_extraction_logs_plain_lines(tiny_data, capsys):
    splits = load_image_folders(tiny_data)
    study.embed(fs.create_model("alexnet_half"), splits.train, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith(
        f"extract: {len(splits.train)}/{len(splits.train)} img (100%)"
    )


def test_stage_maps_match_a_manual_forward():
    model = fs.create_model("alexnet").eval()
    image = torch.randn(3, 227, 227)
    maps = study.stage_maps(model, image)
    with torch.no_grad():
        c1 = model.conv1(image[None])
        c2 = model.conv2(c1)
        c3 = model.conv3(c2)
        logits = model.fc(torch.flatten(c3, 1))
    for stage, expected in (("conv1", c1), ("conv2", c2), ("conv3", c3), ("fc", logits)):
        torch.testing.assert_close(maps[stage], expected[0])


def test_embeddings_are_the_post_relu_second_fc(tiny_data):
    splits = load_image_folders(tiny_data)
    model = fs.create_model("alexnet").eval()
    extraction = study.embed(model, splits.train, progress=False)
    images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    with torch.no_grad():
        hidden = model.fc[:5](torch.flatten(model.conv3(model.conv2(model.conv1(images))), 1))
    torch.testing.assert_close(torch.as_tensor(extraction["embedding"]), hidden)
    assert (hidden >= 0).all()
    index = study.index_embeddings(extraction)
    assert index.metadata == [path for path, _ in splits.train.samples]
    assert index.labels.tolist() == [label for _, label in splits.train.samples]
    result = index.search(hidden[:3], 1)
    assert result.ids[:, 0].tolist() == [0, 1, 2]


def test_bad_data_folder_is_a_clear_error(tmp_path, tiny_preset):
    with pytest.raises(fs.FeaturescopeError, match="train"):
        run_demo(tmp_path / "out", data=tmp_path, preset=tiny_preset, progress=False)


def test_report_facts_are_derived_from_the_run(demo_out):
    """Model names, widths, preprocessing and the embedding's size come from the run itself."""
    out, metrics = demo_out
    width = metrics["width_comparison"]
    for name, count in width["parameters"].items():
        assert count == sum(p.numel() for p in fs.create_model(name, num_classes=5).parameters())
    retrieval = metrics["retrieval"]
    model = fs.create_model(retrieval["model"])
    assert retrieval["embedding_node"] == fs.model_metadata(model).embedding_node
    node, size = retrieval["embedding_node"], fs.model_metadata(model).input_size
    with torch.no_grad():
        embedding = fs.FeatureTap(model.eval(), [node])(torch.zeros(1, *size))[node]
    assert retrieval["embedding_dim"] == embedding.shape[-1]
    maps = metrics["feature_maps"]
    assert maps["overlay_stage"] == next(iter(maps["shapes"]))
    assert maps["preprocessing"] == fs.zoo.resolve_preprocessing(model).to_dict()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"{retrieval['embedding_dim']}-d" in page
    assert f"CenterCrop {maps['preprocessing']['crop']}" in page


def test_width_verdict_compares_by_parameter_count_not_by_name():
    from featurescope.study.report import _width_verdict

    runs = [
        {"model": "wide_net", "parameters": 900, "best_val_acc": 0.8},
        {"model": "thin_net", "parameters": 100, "best_val_acc": 0.6},
    ]
    assert "full width 0.800, half width 0.600" in _width_verdict(runs)
    assert "did worse, as the study found" in _width_verdict(runs)
    assert _width_verdict(runs[:1]) == ""
