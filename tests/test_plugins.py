"""The plugin system: one test per hook, error isolation, override order, entry points."""

from __future__ import annotations

import importlib
import re
import sys
import threading
import types
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

import featurescope as fs
from _plugin_module import plugin_module
from featurescope import hookimpl, plugins
from featurescope.cli import main as cli_main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "featurescope-histogram"


# Every test starts from a newly built plugin manager and leaves none behind (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plugins")


@pytest.fixture
def autoload(monkeypatch):
    """Let entry points load as they would outside the test suite."""
    monkeypatch.delattr(sys, "_called_from_test", raising=False)
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins._reset()


def make_distribution(
    root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> Path:
    """Write an installed-looking distribution (dist-info and modules) under ``root``."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)
    importlib.invalidate_caches()
    return root


def unique_module() -> str:
    return f"fs_fake_plugin_{uuid.uuid4().hex[:10]}"


VISUALIZER_PLUGIN = """
from matplotlib.figure import Figure
from featurescope import hookimpl

def draw(data, **options):
    fig = Figure()
    fig.add_subplot(1, 1, 1).set_title("{label}")
    return fig

@hookimpl
def featurescope_register_visualizers():
    return {{"{name}": draw}}
"""


def namespace_plugin(**hooks: Any) -> types.ModuleType:
    return plugin_module(**hooks)


# --- one test per hook ------------------------------------------------------------------------


def test_hook_register_models():
    def builder(num_classes: int = 5) -> torch.nn.Module:
        return torch.nn.Linear(4, num_classes)

    name = fs.register_plugin(
        namespace_plugin(featurescope_register_models=lambda: {"toy_linear": builder}), "toy"
    )
    assert "toy_linear" in fs.list_models("toy*")
    info = fs.get_model_info("toy_linear")
    assert info.plugin == name
    model = fs.create_model("toy_linear", num_classes=3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), F.linear(x, model.weight, model.bias))
    fs.unregister_plugin(name)
    assert "toy_linear" not in fs.list_models()


def test_hook_register_visualizers():
    calls = []

    def draw(data, *, colour="red"):
        calls.append((data, colour))
        return Figure()

    fs.register_plugin(
        namespace_plugin(featurescope_register_visualizers=lambda: {"toy_view": draw}), "toy"
    )
    assert "toy_view" in fs.list_visualizers()
    data = object()
    fig = fs.visualize("toy_view", data, colour="blue")
    assert isinstance(fig, Figure)
    assert calls == [(data, "blue")]
    assert fs.get_visualizer("toy_view") is draw


def test_hook_features_extracted():
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, Any]] = []

        @hookimpl
        def featurescope_features_extracted(self, features, info):
            self.calls.append((features, info))

    first, second = Recorder(), Recorder()
    fs.register_plugin(first, "recorder-1")
    fs.register_plugin(second, "recorder-2")
    features = {"conv1": np.zeros((2, 3))}
    info = {"model": "alexnet", "nodes": ["conv1"], "num_samples": 2}
    pm = plugins.get_plugin_manager()
    pm.hook.featurescope_features_extracted(features=features, info=info)
    # Not firstresult: every plugin sees the same objects, once.
    assert first.calls == [(features, info)]
    assert second.calls == [(features, info)]


# --- error isolation ----------------------------------------------------------------------------


def test_plugin_raising_in_registry_hook_is_named():
    def broken():
        raise RuntimeError("boom")

    fs.register_plugin(namespace_plugin(featurescope_register_visualizers=broken), "broken-one")
    with pytest.raises(
        fs.PluginError, match=r"'broken-one'.*featurescope_register_visualizers.*boom"
    ):
        fs.list_visualizers()
    with pytest.raises(fs.PluginError, match="broken-one") as excinfo:
        fs.visualize("grid", torch.rand(2, 3, 3))
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_plugin_raising_in_features_extracted_is_named():
    def broken(features, info):
        raise KeyError("missing")

    fs.register_plugin(namespace_plugin(featurescope_features_extracted=lambda **kw: None), "ok")
    fs.register_plugin(namespace_plugin(featurescope_features_extracted=broken), "bad-logger")
    # pluggy's own hook, called as pluggy's authors call it; featurescope patches nothing.
    hook = plugins.get_plugin_manager().hook.featurescope_features_extracted
    with pytest.raises(KeyError) as raised:
        hook(features={}, info={})
    error = plugins.hook_failed(hook, raised.value)
    assert re.match(
        r"plugin 'bad-logger' raised KeyError in featurescope_features_extracted", str(error)
    )


def test_registry_hook_returning_a_non_mapping_is_named():
    fs.register_plugin(namespace_plugin(featurescope_register_models=lambda: ["x"]), "listy")
    with pytest.raises(fs.PluginError, match=r"'listy'.*must return a dict"):
        fs.list_models()


def test_entry_point_that_fails_to_import_is_named(tmp_path, monkeypatch, autoload):
    module = unique_module()
    make_distribution(
        tmp_path,
        "fs-broken-plugin",
        {"broken": module},
        {module: "raise ImportError('needs a missing library')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(fs.PluginError, match=r"'broken'.*fs-broken-plugin.*missing library"):
        plugins.get_plugin_manager()
    # It keeps failing rather than carrying on with half the plugins loaded.
    with pytest.raises(fs.PluginError, match="'broken'"):
        fs.list_visualizers()
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    assert "grid" in fs.list_visualizers()


def test_explicit_load_entrypoints_names_failing_plugin(tmp_path, monkeypatch):
    module = unique_module()
    make_distribution(tmp_path, "fs-syntax", {"syntax": module}, {module: "def (:\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(fs.PluginError, match=r"'syntax'.*SyntaxError"):
        plugins.load_entrypoints()


def test_misspelt_hook_is_an_error_suggesting_the_right_name():
    plugin = namespace_plugin(featurescope_register_visualisers=lambda: {})
    with pytest.raises(fs.PluginError, match="featurescope_register_visualizers"):
        fs.register_plugin(plugin, "typo")
    assert "typo" not in [p.name for p in fs.list_plugins()]


def test_hook_without_marker_is_an_error():
    plugin = types.ModuleType("unmarked")
    plugin.featurescope_register_models = lambda: {}  # type: ignore[attr-defined]
    with pytest.raises(fs.PluginError, match="without the hookimpl marker"):
        fs.register_plugin(plugin, "unmarked")


def test_hook_with_wrong_arguments_is_an_error():
    plugin = namespace_plugin(featurescope_features_extracted=lambda feats, info: None)
    with pytest.raises(fs.PluginError, match=r"'wrong-args'.*hookspecs"):
        fs.register_plugin(plugin, "wrong-args")


def test_register_and_unregister_errors():
    fs.register_plugin(namespace_plugin(featurescope_register_models=lambda: {}), "dup")
    with pytest.raises(fs.PluginError, match="'dup'"):
        fs.register_plugin(namespace_plugin(featurescope_register_models=lambda: {}), "dup")
    with pytest.raises(fs.PluginError, match="Did you mean: 'dup'"):
        fs.unregister_plugin("dupp")


def test_an_unhashable_plugin_is_refused_with_the_fix():
    plugin = types.SimpleNamespace(featurescope_register_models=hookimpl(lambda: {}))
    with pytest.raises(fs.PluginError, match=r"'spaced'.*SimpleNamespace.*types.ModuleType"):
        fs.register_plugin(plugin, "spaced")
    assert "spaced" not in [p.name for p in fs.list_plugins()]


def test_a_plugin_is_asked_through_pluggy_with_its_own_wrapper():
    """What a plugin provides is asked of pluggy, so the plugin's own wrapper takes part."""
    plugin = namespace_plugin(featurescope_register_visualizers=lambda: {"plain": print})

    def add_one() -> Any:
        results = yield  # pluggy's list of this plugin's answers
        return [{**views, "wrapped": print} for views in results]

    plugin.featurescope_register_visualizers_wrapper = hookimpl(
        wrapper=True, specname="featurescope_register_visualizers"
    )(add_one)
    fs.register_plugin(plugin, "wrapping")
    assert plugins.plugin_provides("wrapping")["visualizers"] == ["plain", "wrapped"]
    assert fs.get_visualizer("wrapped") is print
    assert fs.get_visualizer("plain") is print


def test_register_model_goes_through_one_builtin_plugin():
    from featurescope.zoo import decorated

    @fs.register_model("decorated_probe")
    def probe(num_classes: int = 5) -> torch.nn.Module:
        return torch.nn.Linear(2, num_classes)

    try:
        assert fs.get_model_info("decorated_probe").plugin == "featurescope.zoo.decorated"
        assert plugins.plugin_provides("featurescope.zoo.decorated")["models"] == [
            "decorated_probe"
        ]
        # A name a plugin gives is refused at once, naming that plugin.
        with pytest.raises(fs.FeaturescopeError, match="'alexnet'.*'featurescope.zoo.alexnet'"):
            fs.register_model("alexnet")(probe)
    finally:
        decorated.remove("decorated_probe")
    assert "decorated_probe" not in fs.list_models()
    with pytest.raises(fs.UnknownNameError, match="decorated_probe"):
        decorated.remove("decorated_probe")


# --- override order -----------------------------------------------------------------------------


def _grid_override(mark: str) -> types.ModuleType:
    def draw(data, **options):
        fig = Figure()
        fig.add_subplot(1, 1, 1).set_title(mark)
        return fig

    return namespace_plugin(featurescope_register_visualizers=lambda: {"grid": draw})


@pytest.mark.parametrize("mark", [{}, {"trylast": True}, {"tryfirst": True}])
def test_third_party_overrides_builtin(mark):
    plugin = _grid_override("third party")
    plugin.featurescope_register_visualizers = hookimpl(**mark)(
        plugin.featurescope_register_visualizers
    )
    fs.register_plugin(plugin, "better-grid")
    with pytest.warns(fs.errors.PluginOverrideWarning, match="'better-grid' replaces the builtin"):
        fig = fs.visualize("grid", torch.rand(3, 4, 4))
    assert [ax.get_title() for ax in fig.axes] == ["third party"]
    from featurescope.visualizers import VISUALIZERS

    assert VISUALIZERS.get("grid").plugin == "better-grid"
    fs.unregister_plugin("better-grid")
    assert len(fs.visualize("grid", torch.rand(3, 4, 4)).axes) == 3


def test_two_third_party_plugins_with_one_name_is_an_error_naming_both():
    fs.register_plugin(_grid_override("a"), "grid-a")
    fs.register_plugin(_grid_override("b"), "grid-b")
    with pytest.raises(fs.PluginError, match=r"'grid'.*'grid-a'.*'grid-b'"):
        fs.list_visualizers()


def test_two_entry_point_plugins_with_one_name_is_an_error(tmp_path, monkeypatch):
    modules = {}
    for label in ("one", "two"):
        module = unique_module()
        modules[label] = module
        make_distribution(
            tmp_path / label,
            f"fs-views-{label}",
            {f"views-{label}": module},
            {module: VISUALIZER_PLUGIN.format(name="shared_view", label=label)},
        )
        monkeypatch.syspath_prepend(str(tmp_path / label))
    assert sorted(plugins.load_entrypoints()) == ["views-one", "views-two"]
    with pytest.raises(
        fs.PluginError, match=r"'shared_view'.*'views-(one|two)'.*'views-(one|two)'"
    ):
        fs.visualize("shared_view", None)


def test_builtin_models_and_visualizers_are_plugins():
    infos = fs.list_plugins()
    assert tuple(p.name for p in infos) == plugins.DEFAULT_PLUGINS
    assert {p.source for p in infos} == {"builtin"}
    provides = {p.name: plugins.plugin_provides(p.name) for p in infos}
    assert provides["featurescope.visualizers.grid"] == {"models": [], "visualizers": ["grid"]}
    models = sorted(m for p in provides.values() for m in p["models"])
    assert models == fs.list_models()
    views = sorted(v for p in provides.values() for v in p["visualizers"])
    assert (
        views
        == fs.list_visualizers()
        == ["curves", "gradcam", "grid", "montage", "overlay", "similarity", "sum", "units"]
    )


# --- discovery and the autoload switch -----------------------------------------------------------


@pytest.fixture
def fake_views(tmp_path, monkeypatch):
    module = unique_module()
    make_distribution(
        tmp_path,
        "fs-fake-views",
        {"fake-views": module},
        {module: VISUALIZER_PLUGIN.format(name="fake_view", label="fake")},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


def test_entry_point_plugins_autoload(fake_views, autoload):
    assert "fake_view" in fs.list_visualizers()
    (info,) = [p for p in fs.list_plugins() if p.name == "fake-views"]
    assert (info.source, info.module, info.distribution, info.version) == (
        "entry point",
        fake_views,
        "fs-fake-views",
        "1.0",
    )
    assert info.hooks == ("featurescope_register_visualizers",)


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_autoload_hides_entry_point_plugins(fake_views, autoload, monkeypatch, value):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, value)
    plugins._reset()
    assert plugins.autoload_disabled()
    assert "fake_view" not in fs.list_visualizers()
    assert "fake-views" not in [p.name for p in fs.list_plugins()]
    # Loading them explicitly still works: the switch is only about autoloading.
    assert plugins.load_entrypoints() == ["fake-views"]
    assert "fake_view" in fs.list_visualizers()


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_falsy_switch_values_keep_autoload(fake_views, autoload, monkeypatch, value):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, value)
    plugins._reset()
    assert "fake_view" in fs.list_visualizers()


def test_test_suite_never_autoloads(fake_views):
    assert getattr(sys, "_called_from_test", False)
    assert "fake_view" not in fs.list_visualizers()


def test_get_plugin_manager_is_one_object_across_threads():
    seen = []
    threads = [
        threading.Thread(target=lambda: seen.append(plugins.get_plugin_manager())) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(pm) for pm in seen}) == 1


# --- the example third-party package -------------------------------------------------------------


def _example_entry_points() -> dict[str, str]:
    """The entry points the example's pyproject.toml declares, as pip would install them."""
    text = (EXAMPLE / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: read the one table by hand
        table = text.split(f"[project.entry-points.{plugins.ENTRY_POINT_GROUP}]", 1)[1]
        table = table.split("\n[", 1)[0]
        pairs = re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', table, re.MULTILINE)
        return dict(pairs)
    project = tomllib.loads(text)["project"]
    return dict(project["entry-points"][plugins.ENTRY_POINT_GROUP])


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The example package as if pip-installed: its real module, its pyproject's entry point."""
    make_distribution(tmp_path, "featurescope-histogram", _example_entry_points())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return tmp_path


def _tinynet_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    conv1, conv2, linear = model[0], model[3], model[7]
    h = F.max_pool2d(F.relu(F.conv2d(x, conv1.weight, conv1.bias, padding=1)), 2)
    h = F.relu(F.conv2d(h, conv2.weight, conv2.bias, padding=1)).mean(dim=(2, 3))
    return F.linear(h, linear.weight, linear.bias)


def test_example_plugin_by_entry_point(example_plugin, autoload, tmp_path, monkeypatch):
    assert "tinynet" in fs.list_models()
    assert "histogram" in fs.list_visualizers()
    info = fs.get_model_info("tinynet")
    assert info.plugin == "histogram"
    assert info.input_size == (3, 64, 64)

    model = fs.create_model("tinynet", num_classes=4).eval()
    x = torch.rand(2, *info.input_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _tinynet_reference(model, x))
        maps = model[:5](x)[0]  # a real [16, 32, 32] feature map, after the second ReLU

    fig = fs.visualize("histogram", maps, max_channels=5, bins=12)
    (ax,) = fig.axes
    assert len(ax.get_legend().get_texts()) == 5
    out = fs.save_figure(fig, tmp_path / "hist.png")
    assert np.asarray(Image.open(out).convert("L"), dtype=float).std() > 0

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins._reset()
    assert "tinynet" not in fs.list_models()
    assert "histogram" not in fs.list_visualizers()
    with pytest.raises(fs.UnknownNameError, match="histogram"):
        fs.visualize("histogram", maps)


def test_cli_lists_plugins_where_from_and_what_they_provide(example_plugin, capsys):
    plugins.load_entrypoints()
    fs.register_plugin(_grid_override("mine"), "my-grid")
    assert cli_main(["plugins", "--hooks"]) == 0
    out = capsys.readouterr().out
    assert "featurescope.zoo.alexnet  [builtin]" in out
    assert "models: alexnet, alexnet_half" in out
    assert "histogram  [entry point, featurescope-histogram 1.0]  featurescope_histogram" in out
    assert "models: tinynet" in out
    assert "visualizers: histogram" in out
    assert "visualizers: grid (overridden by my-grid)" in out
    assert "my-grid  [registered]" in out
    assert "hooks: featurescope_register_models, featurescope_register_visualizers" in out


def test_cli_reports_a_broken_plugin_and_fails(capsys):
    def broken():
        raise RuntimeError("boom")

    fs.register_plugin(namespace_plugin(featurescope_register_models=broken), "broken")
    assert cli_main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "error: plugin 'broken' raised RuntimeError" in out
    assert "visualizers: grid" in out  # the other plugins are still listed


# --- misbehaving plugins ------------------------------------------------------------------------


def test_an_entry_point_calling_sys_exit_at_import_is_an_error_naming_it(
    tmp_path, monkeypatch, autoload, capsys
):
    module = unique_module()
    make_distribution(
        tmp_path, "fs-quitter", {"quitter": module}, {module: "import sys\nsys.exit(0)\n"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(fs.PluginError, match=r"'quitter'.*fs-quitter.*called sys.exit\(0\)"):
        plugins.get_plugin_manager()
    # The command line does not exit 0 having done nothing: one line, exit code 1.
    assert cli_main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurescope models: error: plugin 'quitter'") and err.count("\n") == 1


def test_a_registry_hook_calling_sys_exit_is_an_error_naming_the_plugin():
    def quit_now():
        sys.exit(3)

    fs.register_plugin(namespace_plugin(featurescope_register_models=quit_now), "quitter")
    with pytest.raises(fs.PluginError, match=r"plugin 'quitter' called sys.exit\(3\)"):
        fs.list_models()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (RuntimeError("no GPU kernel"), r"raised RuntimeError in the builder .*no GPU kernel"),
        (SystemExit(0), r"called sys.exit\(0\) in the builder of model 'toy_broken'"),
    ],
)
def test_a_builder_that_raises_or_exits_names_its_plugin(failure, expected):
    def builder(num_classes: int = 5) -> torch.nn.Module:
        raise failure

    fs.register_plugin(
        namespace_plugin(featurescope_register_models=lambda: {"toy_broken": builder}), "breaker"
    )
    with pytest.raises(fs.PluginError, match=rf"plugin 'breaker' {expected}") as caught:
        fs.create_model("toy_broken")
    assert caught.value.__cause__ is failure


def test_a_builtin_builder_keeps_its_own_exception():
    with pytest.raises(TypeError):
        fs.create_model("alexnet", no_such_option=1)


def test_a_plugin_overriding_a_builtin_model_warns_once():
    impostor = namespace_plugin(
        featurescope_register_models=lambda: {"alexnet": lambda num_classes=5: torch.nn.Identity()}
    )
    fs.register_plugin(impostor, "impostor")
    with pytest.warns(fs.errors.PluginOverrideWarning) as record:
        assert fs.get_model_info("alexnet").plugin == "impostor"
    assert [str(w.message).split(":")[0] for w in record] == [
        "plugin 'impostor' replaces the builtin model 'alexnet' (of 'featurescope.zoo.alexnet')"
    ]
    # Rebuilt after another plugin registers: not said again (FeaturescopeWarnings are errors
    # in this suite, so a second warning would fail here).
    fs.register_plugin(namespace_plugin(featurescope_register_models=lambda: {}), "other")
    assert isinstance(fs.create_model("alexnet"), torch.nn.Identity)
