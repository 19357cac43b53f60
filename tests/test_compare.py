"""featurescope.compare against textbook HSIC written out here, and the properties CKA must have.

The references are independent of the library: the biased HSIC as ``tr(KHLH) / (n-1)²`` on
``n × n`` Gram matrices (the library never builds one), the unbiased HSIC₁ of Song et al. (2012)
as its closed form and as the U-statistic it is, summed over every 4-tuple of distinct samples.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import featurescope as fs
from featurescope.compare import Comparison, hsic1

F64 = torch.float64


# --- references ----------------------------------------------------------------------------------


def ref_hsic(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Biased HSIC (Gretton et al. 2005): tr(K H L H) / (n - 1)²."""
    n = k.shape[0]
    h = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    return float(torch.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of Kornblith et al. (2019) with K = XXᵀ, L = YYᵀ."""
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return ref_hsic(k, l) / math.sqrt(ref_hsic(k, k) * ref_hsic(l, l))


def ref_hsic1(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Unbiased HSIC₁, Song et al. (2012) eq. 5, with K̃, L̃ the Gram matrices without diagonal."""
    n = k.shape[0]
    kt = k - torch.diag(torch.diag(k))
    lt = l - torch.diag(torch.diag(l))
    one = torch.ones(n, 1, dtype=F64)
    value = (
        torch.trace(kt @ lt)
        + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    )
    return float(value) / (n * (n - 3))


def u_statistic_hsic(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """HSIC₁ as the U-statistic it is (Song et al. 2012, Theorem 2), by brute force."""
    n = k.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
    return total / math.perm(n, 4)


def ref_minibatch_cka(x: torch.Tensor, y: torch.Tensor, batches: list[slice]) -> float:
    """Nguyen et al. (2021): mean HSIC₁ over batches, normalised by the same for each side."""
    xy = sum(ref_hsic1(x[b] @ x[b].T, y[b] @ y[b].T) for b in batches)
    xx = sum(ref_hsic1(x[b] @ x[b].T, x[b] @ x[b].T) for b in batches)
    yy = sum(ref_hsic1(y[b] @ y[b].T, y[b] @ y[b].T) for b in batches)
    return xy / math.sqrt(xx * yy)


def consecutive_batches(n: int, size: int) -> list[slice]:
    """Batches of ``size``, the last absorbing a remainder of fewer than 4 (as documented)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < 4:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True)]


# --- "models" that return given features -----------------------------------------------------------


class Columns(nn.Module):
    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start : self.stop]


class Blocks(nn.Module):
    """Node ``parts.k`` returns the k-th block of columns of the input: features we choose."""

    def __init__(self, widths: list[int], offset: int = 0) -> None:
        super().__init__()
        cuts = np.cumsum([offset, *widths]).tolist()
        self.parts = nn.ModuleList(Columns(a, b) for a, b in itertools.pairwise(cuts))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [part(x) for part in self.parts]


def nodes(k: int) -> list[str]:
    return [f"parts.{i}" for i in range(k)]


def compare_features(
    xs: list[torch.Tensor], ys: list[torch.Tensor], **options
) -> tuple[Comparison, torch.Tensor]:
    """Compare features given as matrices, through the whole public pipeline."""
    data = torch.cat([*xs, *ys], dim=1)
    a = Blocks([x.shape[1] for x in xs])
    b = Blocks([y.shape[1] for y in ys], offset=sum(x.shape[1] for x in xs))
    options.setdefault("progress", False)
    result = fs.compare(
        a, b, TensorDataset(data), nodes_a=nodes(len(xs)), nodes_b=nodes(len(ys)), **options
    )
    return result, data


def gaussian(n: int, p: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=F64) + shift


# --- the references themselves ---------------------------------------------------------------------


def test_hsic1_is_the_u_statistic():
    x, y = gaussian(7, 3, 1), gaussian(7, 2, 2)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    brute = u_statistic_hsic(k, l)
    assert ref_hsic1(k, l) == pytest.approx(brute, rel=1e-10, abs=1e-12)
    library = hsic1(k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l)))
    assert float(library) == pytest.approx(brute, rel=1e-10, abs=1e-12)


def test_textbook_cka_is_the_feature_space_formula():
    x, y = gaussian(9, 4, 3), gaussian(9, 5, 4)
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_space = float(
        torch.linalg.matrix_norm(xc.T @ yc) ** 2
        / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))
    )
    assert ref_cka(x, y) == pytest.approx(feature_space, rel=1e-12)


# --- against the references ------------------------------------------------------------------------


@settings(max_examples=10)
@given(
    n=st.integers(6, 40),
    batch=st.integers(4, 12),
    widths_a=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    widths_b=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    shift=st.sampled_from([0.0, 3.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_exact_streaming_equals_the_full_batch_reference(n, batch, widths_a, widths_b, shift, seed):
    # Correlated sides, and a common shift: the streamed centring must not lose digits to it.
    base = gaussian(n, 4, seed)
    xs = [base[:, :1] * 0.5 + gaussian(n, p, seed + i + 1, shift) for i, p in enumerate(widths_a)]
    ys = [base[:, :1] + gaussian(n, p, seed + 50 + j, shift) for j, p in enumerate(widths_b)]
    result, _ = compare_features(xs, ys, batch_size=batch, estimator="exact")
    expected = torch.tensor([[ref_cka(x - shift, y - shift) for y in ys] for x in xs], dtype=F64)
    assert result.matrix.dtype == F64
    assert result.matrix.shape == (len(xs), len(ys))
    torch.testing.assert_close(result.matrix, expected, rtol=1e-9, atol=1e-12)
    assert result.num_images == n
    assert {e for row in result.estimators for e in row} == {"exact"}


@settings(max_examples=10)
@given(
    n=st.integers(8, 40),
    batch=st.integers(4, 12),
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_minibatch_equals_the_reference_over_the_same_batches(n, batch, widths, seed):
    xs = [gaussian(n, p, seed + i) for i, p in enumerate(widths)]
    ys = [xs[0] @ gaussian(widths[0], 3, seed + 9) + gaussian(n, 3, seed + 10)]
    result, _ = compare_features(xs, ys, batch_size=batch, estimator="minibatch")
    batches = consecutive_batches(n, batch)
    expected = torch.tensor([[ref_minibatch_cka(x, ys[0], batches)] for x in xs], dtype=F64)
    torch.testing.assert_close(result.matrix, expected, rtol=1e-9, atol=1e-12)
    assert result.num_batches == len(batches)


def test_auto_picks_exact_only_where_it_is_affordable_and_near_unbiased():
    n = 800
    xs, y = [gaussian(n, 3, 0), gaussian(n, 12, 1)], gaussian(n, 4, 2)
    result, _ = compare_features(xs, [y], batch_size=100, max_exact_features=8)
    assert result.estimators == (("exact",), ("minibatch",))  # 12 > 8 features: minibatch
    expected = [ref_cka(xs[0], y), ref_minibatch_cka(xs[1], y, consecutive_batches(n, 100))]
    torch.testing.assert_close(
        result.matrix[:, 0], torch.tensor(expected, dtype=F64), rtol=1e-9, atol=0
    )
    # Over 40 images the exact estimate of 3 against 4 features sits ~0.08 above 0: minibatch.
    few, _ = compare_features([xs[0][:40]], [y[:40]], batch_size=10)
    assert few.estimators == (("minibatch",),)


def test_a_dataloader_gives_its_order_and_batch_size():
    x, y = gaussian(20, 3, 5), gaussian(20, 2, 6)
    order = list(range(19, -1, -1))
    loader = DataLoader(TensorDataset(torch.cat([x, y], 1)), batch_size=5, sampler=order)
    result = fs.compare(
        Blocks([3]),
        Blocks([2], offset=3),
        loader,
        nodes_a=nodes(1),
        nodes_b=nodes(1),
        progress=False,
        estimator="minibatch",
    )
    assert result.batch_size == 5
    expected = ref_minibatch_cka(x[order], y[order], consecutive_batches(20, 5))
    assert result["parts.0", "parts.0"] == pytest.approx(expected, rel=1e-10)


# --- properties ------------------------------------------------------------------------------------


def random_orthogonal(p: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(gaussian(p, p, seed))
    return q * torch.sign(torch.diag(r))


@settings(max_examples=10)
@given(
    estimator=st.sampled_from(["exact", "minibatch"]),
    p=st.integers(2, 6),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_self_similarity_is_one_and_invariant_to_rotation_and_scale(estimator, p, scale, seed):
    n = 32
    x = gaussian(n, p, seed)
    y = x[:, :1] ** 2 + gaussian(n, 3, seed + 1)
    moved = x @ random_orthogonal(p, seed + 2) * scale
    result, _ = compare_features([x, moved], [x, y], batch_size=8, estimator=estimator)
    m = result.matrix
    assert float(m[0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert float(m[1, 0]) == pytest.approx(1.0, abs=1e-9)  # rotated and scaled copy of x
    assert float(m[1, 1]) == pytest.approx(float(m[0, 1]), rel=1e-8, abs=1e-12)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), estimator=st.sampled_from(["exact", "minibatch"]))
def test_not_invariant_to_an_arbitrary_invertible_map(seed, estimator):
    # One column stretched 100 times: XA spans the same space, but CKA sees the new geometry
    # (about 1/sqrt(p) here): unlike CCA, CKA is not invariant to invertible linear maps.
    x = gaussian(64, 5, seed)
    stretch = torch.diag(torch.tensor([100.0, 1, 1, 1, 1], dtype=F64))
    result, _ = compare_features([x], [x @ stretch], batch_size=16, estimator=estimator)
    assert torch.linalg.matrix_rank(stretch) == 5
    assert float(result.matrix[0, 0]) < 0.8


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), estimator=st.sampled_from(["exact", "minibatch"]))
def test_symmetric(seed, estimator):
    xs = [gaussian(24, 3, seed), gaussian(24, 2, seed + 1)]
    ys = [xs[0] @ gaussian(3, 4, seed + 2) + gaussian(24, 4, seed + 3)]
    forward, _ = compare_features(xs, ys, batch_size=6, estimator=estimator)
    backward, _ = compare_features(ys, xs, batch_size=6, estimator=estimator)
    torch.testing.assert_close(forward.matrix, backward.matrix.T, rtol=1e-12, atol=1e-14)


def test_independent_features_unbiased_near_zero_and_the_exact_offset():
    # Two independent Gaussian representations of width p over n images. The exact (biased)
    # estimator's expected offset is about p / (n + p) (Wishart moments: E||XᵀY||² = npq,
    # E||XᵀX||² = np(n + p)); the unbiased minibatch estimate is centred on 0.
    n, p = 2000, 40
    x, y = gaussian(n, p, 11), gaussian(n, p, 12)
    offset = p / (n + p)
    exact, _ = compare_features([x], [y], batch_size=100, estimator="exact")
    minibatch, _ = compare_features([x], [y], batch_size=100, estimator="minibatch")
    assert float(exact.matrix[0, 0]) == pytest.approx(offset, rel=0.25)
    assert abs(float(minibatch.matrix[0, 0])) < 0.2 * offset
    small, _ = compare_features([x[:100]], [y[:100]], batch_size=50, estimator="exact")
    assert float(small.matrix[0, 0]) == pytest.approx(p / (100 + p), rel=0.25)  # ~0.29


# --- real models -----------------------------------------------------------------------------------


def small_cnn(seed: int, width: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 3),
    )


def trained(model: nn.Sequential, images: torch.Tensor, labels: torch.Tensor) -> nn.Sequential:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def two_trained_widths():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 3
    # Class-dependent colour blobs: something to learn in 30 steps.
    images = torch.randn(48, 3, 12, 12, generator=g) * 0.5
    images[:, 0] += (labels == 0).float()[:, None, None]
    images[:, 1, 3:9, 3:9] += (labels == 1).float()[:, None, None]
    wide = trained(small_cnn(0, 8), images, labels)
    narrow = trained(small_cnn(1, 4), images, labels)
    return wide, narrow, images, labels


def eager_features(model: nn.Sequential, images: torch.Tensor, upto: int) -> torch.Tensor:
    """The output of module ``upto`` by running the Sequential by hand, flattened, float64."""
    with torch.no_grad():
        out = images
        for module in list(model)[: upto + 1]:
            out = module(out)
    return out.flatten(1).double()


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
def test_trained_models_match_the_reference_on_eager_features(two_trained_widths, estimator):
    wide, narrow, images, labels = two_trained_widths
    layers = [1, 4, 7]  # relu1, relu2, logits
    result = fs.compare(
        wide,
        narrow,
        TensorDataset(images, labels),
        nodes_a=[str(i) for i in layers],
        nodes_b=[str(i) for i in layers],
        batch_size=16,
        estimator=estimator,
        progress=False,
    )
    batches = consecutive_batches(len(images), 16)
    expected = torch.empty(3, 3, dtype=F64)
    for i, la in enumerate(layers):
        for j, lb in enumerate(layers):
            x, y = eager_features(wide, images, la), eager_features(narrow, images, lb)
            exact = estimator == "exact"
            expected[i, j] = ref_cka(x, y) if exact else ref_minibatch_cka(x, y, batches)
    torch.testing.assert_close(result.matrix, expected, rtol=1e-6, atol=1e-9)
    assert {e for row in result.estimators for e in row} == {estimator}


def test_a_model_with_itself_runs_once_and_has_a_unit_diagonal(two_trained_widths):
    wide, _, images, _ = two_trained_widths
    calls = []
    handle = wide[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        result = fs.compare(
            wide,
            wide,
            TensorDataset(images),
            nodes_a=["1", "4", "7"],
            nodes_b={"4": "relu2", "7": "logits"},
            batch_size=16,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(calls) == 3  # three batches, one forward each
    assert result.nodes_b == ("relu2", "logits")
    assert result["4", "relu2"] == pytest.approx(1.0, abs=1e-12)
    assert result["7", "logits"] == pytest.approx(1.0, abs=1e-12)
    assert wide.training is False


def test_models_are_compared_in_eval_mode_and_left_as_they_were(two_trained_widths):
    images = two_trained_widths[2][:16]
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 12 * 12, 4)).train()
    result = fs.compare(
        net,
        net,
        TensorDataset(images),
        nodes_a=["0"],
        nodes_b=["1"],
        batch_size=8,
        progress=False,
        estimator="exact",
    )
    # In eval mode dropout passes its input through: CKA 1. In training mode it would not.
    assert result.matrix.item() == pytest.approx(1.0, abs=1e-12)
    assert net.training and net[1].training


# --- resume ----------------------------------------------------------------------------------------


class Fragile(Dataset):
    """Rows of a tensor; raises at ``fail_at`` (a deterministic interruption), counts reads."""

    def __init__(self, data: torch.Tensor, fail_at: int | None = None) -> None:
        self.data, self.fail_at, self.reads = data, fail_at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.reads += 1
        return self.data[i]


def test_an_interrupted_comparison_resumes_to_the_same_matrix(tmp_path):
    xs = [gaussian(400, 3, 20), gaussian(400, 30, 21)]  # 3 exact, 30 minibatch
    ys = [xs[0] @ gaussian(3, 2, 22) + gaussian(400, 2, 23)]
    data = torch.cat([*xs, *ys], 1)
    a, b = Blocks([3, 30]), Blocks([2], offset=33)
    options = dict(
        nodes_a=nodes(2),
        nodes_b=nodes(1),
        batch_size=40,
        max_exact_features=10,
        progress=False,
        out=tmp_path / "cmp",
    )
    with pytest.raises(KeyboardInterrupt):
        fs.compare(a, b, Fragile(data, fail_at=290), **options)
    assert (tmp_path / "cmp" / "sums.safetensors").is_file()  # the first batch, at least
    again = Fragile(data)
    resumed = fs.compare(a, b, again, **options)
    assert 0 < again.reads < 400  # it did not start over
    whole = fs.compare(a, b, TensorDataset(data), **{**options, "out": None})
    torch.testing.assert_close(resumed.matrix, whole.matrix, rtol=1e-12, atol=1e-14)
    expected = [
        ref_cka(xs[0], ys[0]),
        ref_minibatch_cka(xs[1], ys[0], consecutive_batches(400, 40)),
    ]
    torch.testing.assert_close(
        resumed.matrix[:, 0], torch.tensor(expected, dtype=F64), rtol=1e-9, atol=0
    )
    assert resumed.estimators == whole.estimators == (("exact",), ("minibatch",))
    finished = Fragile(data)
    assert fs.compare(a, b, finished, **options).matrix.equal(resumed.matrix)
    assert finished.reads == 0  # a finished comparison is read back, not recomputed


def test_a_folder_of_another_comparison_is_refused(tmp_path):
    data = TensorDataset(gaussian(12, 4, 0))
    fs.compare(
        Blocks([2]),
        Blocks([2], offset=2),
        data,
        nodes_a=nodes(1),
        nodes_b=nodes(1),
        batch_size=4,
        out=tmp_path,
        progress=False,
    )
    with pytest.raises(fs.FeaturescopeError, match="reduce"):
        fs.compare(
            Blocks([2]),
            Blocks([2], offset=2),
            data,
            nodes_a=nodes(1),
            nodes_b=nodes(1),
            batch_size=4,
            out=tmp_path,
            progress=False,
            reduce="avgpool",
        )
    redone = fs.compare(
        Blocks([2]),
        Blocks([2], offset=2),
        data,
        nodes_a=nodes(1),
        nodes_b=nodes(1),
        batch_size=4,
        out=tmp_path,
        progress=False,
        reduce="avgpool",
        overwrite=True,
    )
    assert redone.reduce == "avgpool"


# --- errors and edges ------------------------------------------------------------------------------


def test_batches_of_fewer_than_four_are_refused():
    with pytest.raises(fs.FeaturescopeError, match=r"at least 4.*m\(m-3\)"):
        compare_features([gaussian(12, 2, 0)], [gaussian(12, 2, 1)], batch_size=3)


def test_a_remainder_under_four_joins_the_last_batch():
    x, y = gaussian(10, 2, 0), gaussian(10, 3, 1)
    result, _ = compare_features([x], [y], batch_size=4, estimator="minibatch")
    assert result.num_batches == 2  # 4 + 6, not 4 + 4 + 2
    assert result.matrix.item() == pytest.approx(
        ref_minibatch_cka(x, y, [slice(0, 4), slice(4, 10)]), rel=1e-10
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"estimator": "unbiased"}, "unknown estimator"),
        ({"reduce": "mean"}, "unknown reduce"),
        ({"max_exact_features": 0}, "positive"),
    ],
)
def test_unknown_options_say_what_is_accepted(option, message):
    with pytest.raises(fs.FeaturescopeError, match=message):
        compare_features([gaussian(8, 2, 0)], [gaussian(8, 2, 1)], batch_size=4, **option)


def test_a_constant_node_gives_nan_and_a_warning():
    x = torch.zeros(12, 3, dtype=F64)
    with pytest.warns(fs.FeaturescopeWarning, match="constant"):
        result, _ = compare_features([x], [gaussian(12, 2, 1)], batch_size=4)
    assert math.isnan(result.matrix.item())
    assert Comparison.from_dict(result.to_dict()).to_dict() == result.to_dict()


def test_nodes_default_to_the_zoo_model_stages_and_must_be_named_otherwise():
    with pytest.raises(fs.FeaturescopeError, match="nodes_a is needed"):
        fs.compare(Blocks([2]), Blocks([2]), TensorDataset(gaussian(8, 4, 0)), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(fs.errors.NodeNotFoundError):
            fs.compare(
                Blocks([2]),
                Blocks([2]),
                TensorDataset(gaussian(8, 4, 0)),
                nodes_a=["nope"],
                nodes_b=nodes(1),
                progress=False,
            )


def test_the_root_name_is_the_function_even_after_importing_the_package():
    import importlib

    # As with fs.train: the package featurescope.compare is reached by from-imports, and the
    # root's name stays the function.
    package = importlib.import_module("featurescope.compare")
    assert callable(fs.compare) and fs.compare is package.compare
    assert package.Comparison is Comparison


def test_csv_and_json_read_back_to_the_same_float64():
    result, _ = compare_features(
        [gaussian(16, 3, 0), gaussian(16, 2, 1)], [gaussian(16, 2, 2)], batch_size=8
    )
    rows = [line.split(",") for line in result.to_csv().splitlines()]
    assert rows[0] == ["node", "parts.0"]
    values = torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]], dtype=F64)
    assert values.equal(result.matrix)
    assert Comparison.from_dict(result.to_dict()).matrix.equal(result.matrix)
