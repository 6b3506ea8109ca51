"""Property tests of tmps.decompose (issue #6): invariants that must hold for every input, not a few examples.

Random shapes, ranks and energy thresholds (hypothesis), then ill-conditioned, rank-deficient and
half-precision inputs. Complements tests/test_decompose.py, which compares against tensorly on
fixed shapes.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmps.decompose import (
    compression_ratio,
    default_tensor_shape,
    hooi,
    input_metric,
    relative_output_error,
    tt_error_bound,
    tt_svd,
    tucker_mps,
    tucker_mps_tensor,
    weighted_svd,
)
from tmps.decompose._linalg import unfold

# Reproducible (the suite seeds everything, see conftest.py) and no .hypothesis/ folder in the tree.
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(min_value=2, max_value=7)
shapes = st.lists(dims, min_size=2, max_size=4).map(tuple)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
scales = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])
# Energy kept by TT-SVD: in (0.5, 1].
energies = st.floats(min_value=0.5, max_value=1.0, exclude_min=True, allow_nan=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sq_norm(t):
    return float(t.double().pow(2).sum())


def rel_error(approx, exact):
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def orthonormality_defect(factor):
    f = factor.double()
    return float((f.T @ f - torch.eye(f.shape[1], dtype=torch.float64)).abs().max())


def hosvd_bound(x, ranks):
    """Σ_n (energy of mode n's singular values beyond r_n): the truncated-HOSVD error bound ‖X − X̂‖²."""
    total = 0.0
    for mode, r in enumerate(ranks):
        s = torch.linalg.svdvals(unfold(x.double(), mode))
        total += float(s[r:].pow(2).sum())
    return total


def odeco(shape, spectrum, seed, dtype=torch.float64):
    """Σ_i s_i a_i ∘ b_i ∘ …: orthonormal a_i, b_i, …, so every unfolding has singular values ``spectrum``."""
    gen = torch.Generator().manual_seed(seed)
    k = spectrum.numel()
    factors = [torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0] for n in shape]
    letters = "abcdefgh"[: len(shape)]
    expr = ",".join(f"{c}z" for c in letters) + ",z->" + letters
    return torch.einsum(expr, *factors, spectrum.to(torch.float64)).to(dtype)


# ---------------------------------------------------------------- HOOI
@PROPERTY
@given(shape=shapes, seed=seeds, scale=scales, data=st.data())
def test_hooi_orthonormal_shapes_and_hosvd_bound(shape, seed, scale, data):
    ranks = [data.draw(st.integers(1, n), label=f"rank{i}") for i, n in enumerate(shape)]
    x = randn(shape, seed) * scale
    t = hooi(x, ranks)
    assert t.core.shape == tuple(ranks)
    assert t.shape == shape
    for f, n, r in zip(t.factors, shape, ranks):
        assert f.shape == (n, r)
        assert orthonormality_defect(f) < 1e-8
    error = sq_norm(t.to_tensor() - x)
    # The classical HOSVD bound; HOOI starts from the truncated HOSVD and each sweep only lowers the error.
    assert error <= hosvd_bound(x, ranks) + 1e-10 * sq_norm(x)
    hosvd = hooi(x, ranks, n_iter_max=0)
    assert error <= sq_norm(hosvd.to_tensor() - x) + 1e-10 * sq_norm(x)
    # Orthonormal factors: ‖X − X̂‖² = ‖X‖² − ‖G‖² (what HOOI's stopping rule relies on).
    assert error == pytest.approx(sq_norm(x) - sq_norm(t.core), abs=1e-9 * sq_norm(x))


@PROPERTY
@given(shape=shapes, seed=seeds, scale=scales)
def test_hooi_full_ranks_exact(shape, seed, scale):
    x = randn(shape, seed) * scale
    t = hooi(x, list(shape))
    assert rel_error(t.to_tensor(), x) < 1e-12


# ---------------------------------------------------------------- TT-SVD
def assert_tt_structure(tt, shape):
    assert len(tt.cores) == len(shape)
    assert tt.ranks[0] == 1 and tt.ranks[-1] == 1
    for k, core in enumerate(tt.cores):
        assert core.shape == (tt.ranks[k], shape[k], tt.ranks[k + 1])
    for core in tt.cores[:-1]:  # left-orthonormal: (r_{k-1} n_k, r_k) has orthonormal columns
        assert orthonormality_defect(core.reshape(-1, core.shape[2])) < 1e-8


@PROPERTY
@given(shape=shapes, seed=seeds, scale=scales, eps=energies)
def test_tt_svd_error_bound_orthonormal_cores_and_rank_chain(shape, seed, scale, eps):
    x = randn(shape, seed) * scale
    tt = tt_svd(x, eps=eps)
    assert_tt_structure(tt, shape)
    assert rel_error(tt.to_tensor(), x) <= tt_error_bound(x.ndim, eps) + 1e-9
    for k in range(1, len(shape)):  # no internal rank above the unfolding's
        assert tt.ranks[k] <= min(math.prod(shape[:k]), math.prod(shape[k:]))


@PROPERTY
@given(shape=shapes, seed=seeds, max_rank=st.integers(1, 8), eps=st.none() | energies)
def test_tt_svd_max_rank_caps_every_rank(shape, seed, max_rank, eps):
    x = randn(shape, seed)
    tt = tt_svd(x, eps=eps, max_rank=max_rank)
    assert_tt_structure(tt, shape)
    assert max(tt.ranks) <= max_rank
    if eps is None:
        # Oseledets (2011), Thm 2.2: ‖X − X̂‖² ≤ Σ_k (best rank-r_k error of the k-th unfolding)².
        bound = 0.0
        for k in range(1, len(shape)):
            s = torch.linalg.svdvals(x.reshape(math.prod(shape[:k]), -1))
            bound += float(s[tt.ranks[k]:].pow(2).sum())
        assert sq_norm(tt.to_tensor() - x) <= bound + 1e-10 * sq_norm(x)


# ---------------------------------------------------------------- Tucker-MPS
three_way = st.tuples(dims, dims, dims)


@PROPERTY
@given(shape=three_way, seed=seeds, eps=energies, data=st.data())
def test_tucker_mps_tensor_shapes_orthonormality_and_ratio(shape, seed, eps, data):
    hooi_ranks = [data.draw(st.integers(1, n), label=f"rank{i}") for i, n in enumerate(shape)]
    x = randn(shape, seed)
    tucker, (s1, s2) = tucker_mps_tensor(x, mps_eps=eps, hooi_ranks=hooi_ranks)
    n1, n2, n3 = shape
    assert 1 <= s1 <= min(n1, n2 * n3) and 1 <= s2 <= min(n3, n1 * n2)
    expected = (min(hooi_ranks[0], s1), min(hooi_ranks[1], n2), min(hooi_ranks[2], s2))
    assert tucker.ranks == expected and tucker.shape == shape and tucker.modes == [0, 1, 2]
    for f, n, r in zip(tucker.factors, shape, expected):
        assert f.shape == (n, r)
        assert orthonormality_defect(f) < 1e-8
    kept = math.prod(expected) + sum(n * r for n, r in zip(shape, expected))
    assert tucker.num_parameters() == kept
    assert compression_ratio(tucker.num_parameters(), x.numel()) == kept / x.numel()
    assert torch.isfinite(tucker.to_tensor()).all()


@PROPERTY
@given(m=st.integers(2, 24), n=st.integers(2, 24), seed=seeds, eps=energies, data=st.data())
def test_tucker_mps_matrix_shapes_and_reported_ratio(m, n, seed, eps, data):
    shape = default_tensor_shape(m, n)
    assert math.prod(shape) == m * n
    hooi_ranks = [data.draw(st.integers(1, k), label=f"rank{i}") for i, k in enumerate(shape)]
    w = randn((m, n), seed)
    result = tucker_mps(w, mps_eps=eps, hooi_ranks=hooi_ranks)
    assert result.matrix_shape == (m, n) and result.tensor_shape == shape
    assert result.to_matrix().shape == (m, n)
    r = result.ranks
    kept = r[0] * r[1] * r[2] + sum(k * rk for k, rk in zip(shape, r))
    assert result.num_parameters() == kept
    assert result.compression_ratio() == kept / (m * n)


@PROPERTY
@given(shape=three_way, seed=seeds)
def test_tucker_mps_exact_at_full_energy_and_ranks(shape, seed):
    x = randn(shape, seed)
    tucker, _ = tucker_mps_tensor(x, mps_eps=1.0, hooi_ranks=list(shape))
    assert rel_error(tucker.to_tensor(), x) < 1e-9


# ---------------------------------------------------------------- ill-conditioned and rank-deficient inputs
ILL_SHAPE = (9, 8, 7)
SPECTRA = {
    "graded_1e-12": torch.logspace(0, -12, 7, dtype=torch.float64),
    "rank_3": torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64),
    "rank_1": torch.tensor([1.0] + [0.0] * 6, dtype=torch.float64),
}


@pytest.mark.parametrize("name", SPECTRA)
def test_ill_conditioned_hooi_matches_known_spectrum(name):
    s = SPECTRA[name]
    x = odeco(ILL_SHAPE, s, seed=1)
    for k in (1, 2, 4, 7):
        t = hooi(x, [k, k, k])
        assert torch.isfinite(t.core).all() and all(torch.isfinite(f).all() for f in t.factors)
        for f in t.factors:
            assert orthonormality_defect(f) < 1e-8
        # Every unfolding has spectrum s: the best multilinear rank-(k,k,k) error is the tail of s.
        tail = float(s[k:].pow(2).sum())
        assert sq_norm(t.to_tensor() - x) == pytest.approx(tail, abs=1e-20 + 1e-12 * sq_norm(x))
    assert rel_error(hooi(x, list(ILL_SHAPE)).to_tensor(), x) < 1e-12


@pytest.mark.parametrize("name", SPECTRA)
def test_ill_conditioned_tt_svd(name):
    s = SPECTRA[name]
    x = odeco(ILL_SHAPE, s, seed=2)
    for eps in (0.6, 0.9, 0.999, 1.0):
        tt = tt_svd(x, eps=eps)
        assert all(torch.isfinite(c).all() for c in tt.cores)
        assert_tt_structure(tt, ILL_SHAPE)
        assert rel_error(tt.to_tensor(), x) <= tt_error_bound(3, eps) + 1e-9
    # At eps = 1 an exactly rank-deficient tensor gets exactly its rank (not its rounding noise)
    # and is reproduced; a graded one loses at most the energy share ENERGY_SLACK per step.
    exact = tt_svd(x, eps=1.0)
    if name == "graded_1e-12":
        assert rel_error(exact.to_tensor(), x) <= tt_error_bound(3, 1.0) + 1e-9
    else:
        true_rank = int((s > 0).sum())
        assert exact.ranks == (1, true_rank, true_rank, 1)
        assert rel_error(exact.to_tensor(), x) < 1e-12


def test_zero_tensor_decomposes_to_zero():
    x = torch.zeros(4, 5, 3, dtype=torch.float64)
    for approx in (hooi(x, [2, 2, 2]).to_tensor(), tt_svd(x, eps=0.9).to_tensor(),
                   tucker_mps_tensor(x, 0.9, [2, 2, 2])[0].to_tensor()):
        assert torch.equal(approx, torch.zeros_like(x))
    assert tt_svd(x, eps=0.9).ranks == (1, 1, 1, 1)


def test_ill_conditioned_matrix_tucker_mps():
    gen = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(30, 24, generator=gen, dtype=torch.float64))[0]
    for s in (torch.logspace(0, -12, 24, dtype=torch.float64),
              torch.cat([torch.ones(5, dtype=torch.float64), torch.zeros(19, dtype=torch.float64)])):
        w = (u * s) @ v.T
        shape = default_tensor_shape(24, 30)
        full = tucker_mps(w, mps_eps=1.0, hooi_ranks=shape)
        assert torch.isfinite(full.to_matrix()).all()
        assert rel_error(full.to_matrix(), w) <= tt_error_bound(3, 1.0) + 1e-9
        small = tucker_mps(w, mps_eps=0.9, hooi_ranks=[2, 2, 2])
        assert torch.isfinite(small.to_matrix()).all()
        for f in small.tucker.factors:
            assert orthonormality_defect(f) < 1e-8


# ---------------------------------------------------------------- half precision: computed in float32, cast back
# Tolerance on |relative error(half) − relative error(float64 on the same rounded input)|: the
# decompositions run in float32, then the factors are rounded to the half type (unit roundoff
# 2**-11 for float16, 2**-8 for bfloat16) and the reconstruction is summed in that type.
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2}
HALF_INPUTS = {
    "random": lambda: randn((9, 8, 7), 4),
    "graded": lambda: odeco((9, 8, 7), torch.logspace(0, -12, 7), seed=5) * 50,
    "rank_3": lambda: odeco((9, 8, 7), SPECTRA["rank_3"], seed=6) * 10,
}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE))
@pytest.mark.parametrize("name", list(HALF_INPUTS))
def test_half_precision_close_to_float64(dtype, name):
    x = HALF_INPUTS[name]().to(dtype)
    ref_input = x.double()  # the same rounded values, decomposed in float64
    tol = HALF_TOLERANCE[dtype]
    cases = [
        (lambda t: hooi(t, [3, 3, 3]).to_tensor(), "hooi"),
        (lambda t: tt_svd(t, eps=0.95).to_tensor(), "tt_svd"),
        (lambda t: tt_svd(t, max_rank=3).to_tensor(), "tt_svd max_rank"),
        (lambda t: tucker_mps_tensor(t, 0.95, [3, 3, 3])[0].to_tensor(), "tucker_mps_tensor"),
    ]
    for run, label in cases:
        approx = run(x)
        assert approx.dtype == dtype, label
        assert torch.isfinite(approx).all(), label
        ref = run(ref_input)
        assert abs(rel_error(approx, ref_input) - rel_error(ref, ref_input)) < tol, label
    t = hooi(x, [3, 3, 3])
    assert t.core.dtype == dtype and all(f.dtype == dtype for f in t.factors)
    assert all(orthonormality_defect(f) < 8 * torch.finfo(dtype).eps for f in t.factors)
    assert all(c.dtype == dtype for c in tt_svd(x, eps=0.95).cores)
    matrix = x.reshape(9, 56)
    result = tucker_mps(matrix, mps_eps=0.95, hooi_ranks=[2, 2, 3])
    assert result.to_matrix().dtype == dtype and torch.isfinite(result.to_matrix()).all()


# ---------------------------------------------------------------- activation-aware low rank, degenerate covariances
def covariances():
    gen = torch.Generator().manual_seed(7)
    n = 12
    few_tokens = torch.randn(4, n, generator=gen, dtype=torch.float64)  # rank 4 of 12
    dead = torch.randn(50, n, generator=gen, dtype=torch.float64)
    dead[:, [0, 5, 6]] = 0  # three input features never active: zero rows and columns
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    graded = (q * torch.logspace(0, -14, n, dtype=torch.float64)) @ q.T
    rank_one = torch.randn(1, n, generator=gen, dtype=torch.float64)
    return {
        "rank_4": few_tokens.T @ few_tokens,
        "dead_features": dead.T @ dead,
        "graded_1e-14": graded,
        "rank_1": rank_one.T @ rank_one,
        "float32_asymmetric": (few_tokens.T @ few_tokens).float() + 1e-6 * torch.randn(n, n, generator=gen),
    }


@pytest.mark.parametrize("name", list(covariances()))
def test_weighted_svd_finite_and_output_optimal_with_degenerate_covariance(name):
    cov = covariances()[name]
    metric = input_metric(cov)
    assert torch.isfinite(metric.sqrt).all() and torch.isfinite(metric.inv_sqrt).all()
    # L L^T reproduces the (damped) covariance and L^-1 inverts L.
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    assert float((metric.inv_sqrt @ metric.sqrt - eye).abs().max()) < 1e-4
    w = torch.randn(8, cov.shape[0], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for rank in (1, 3, 8):
        a, b = weighted_svd(w, metric, rank)
        assert a.shape == (8, rank) and b.shape == (cov.shape[0], rank)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        error = relative_output_error(w, a @ b.T, cov.double())
        assert math.isfinite(error)
        # Never worse in output error than the plain SVD of W at the same rank (up to the damping).
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        plain = relative_output_error(w, (u[:, :rank] * s[:rank]) @ vh[:rank], cov.double())
        assert error <= plain + 1e-3
    a, b = weighted_svd(w, metric, 8)  # full rank: exact despite the singular covariance
    assert rel_error(a @ b.T, w) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_svd_half_precision_weight(dtype):
    cov = covariances()["dead_features"]
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(9)).to(dtype)
    a, b = weighted_svd(w, input_metric(cov), 4)
    assert a.dtype == dtype and b.dtype == dtype
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    a64, b64 = weighted_svd(w.double(), input_metric(cov), 4)
    half = relative_output_error(w.double(), (a.double() @ b.double().T), cov)
    full = relative_output_error(w.double(), a64 @ b64.T, cov)
    assert abs(half - full) < HALF_TOLERANCE[dtype]


def test_input_metric_refuses_zero_covariance():
    with pytest.raises(ValueError, match="covariance is zero"):
        input_metric(torch.zeros(5, 5))


# ---------------------------------------------------------------- rank allocation in aligned steps
def _single_direction_greedy(values, costs, budget, minimum):
    """The allocator before aligned ranks, written plainly: take directions best value-per-cost first."""
    ranks = [min(minimum, v.numel()) for v in values]
    spent = sum(r * c for r, c in zip(ranks, costs))
    scores = [v[r:] / c for v, r, c in zip(values, ranks, costs)]
    owners = torch.cat([torch.full((s.numel(),), j) for j, s in enumerate(scores)])
    for j in owners[torch.argsort(torch.cat(scores), descending=True, stable=True)].tolist():
        if spent + costs[j] <= budget + 1e-9:
            ranks[j] += 1
            spent += costs[j]
    return ranks


@PROPERTY
@given(widths=st.lists(st.integers(1, 40), min_size=1, max_size=6), fill=st.floats(0.0, 1.0),
       multiple=st.sampled_from([1, 4, 8]), seed=st.integers(0, 2**16))
def test_grow_prefixes_aligned_within_budget_and_plain_greedy_at_one(widths, fill, multiple, seed):
    from tmps.solvers import grow_prefixes, non_increasing

    gen = torch.Generator().manual_seed(seed)
    scales = (10 ** (4 * torch.rand(len(widths), generator=gen, dtype=torch.float64))).tolist()
    values = [non_increasing(torch.rand(w, generator=gen, dtype=torch.float64) * s) for w, s in zip(widths, scales)]
    costs = [float(c) for c in torch.randint(1, 4, (len(widths),), generator=gen).tolist()]
    floor = sum(min(w, multiple) * c for w, c in zip(widths, costs))
    budget = floor + fill * (sum(w * c for w, c in zip(widths, costs)) - floor)
    ranks = grow_prefixes(values, costs, budget, 1, multiple)
    assert all(r == w or r % multiple == 0 for r, w in zip(ranks, widths))
    assert all(min(w, multiple) <= r <= w for r, w in zip(ranks, widths))
    assert sum(r * c for r, c in zip(ranks, costs)) <= budget + 1e-9
    if multiple == 1:
        assert ranks == _single_direction_greedy(values, costs, budget, 1)
