"""The torch decompositions against tensorly (the reference implementation) and against their math."""
import math

import pytest
import torch

from tmps.decompose import (
    combined_mps_hooi_compression,
    default_tensor_shape,
    energy_rank,
    hooi,
    input_metric,
    relative_output_error,
    tt_error_bound,
    tt_svd,
    tt_to_tensor,
    tucker_mps,
    tucker_mps_tensor,
    tucker_to_tensor,
    weighted_svd,
)

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import tensor_train, tucker  # noqa: E402

tl.set_backend("pytorch")

SHAPES_AND_RANKS = [
    ((11, 7), [3, 4]),
    ((13, 9, 5), [4, 3, 2]),
    ((20, 17, 13), [5, 6, 7]),
    ((9, 8, 7, 6), [3, 4, 5, 2]),
]


def rel_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def low_rank_tucker(shape, ranks, noise=0.0, dtype=torch.float64):
    core = torch.randn(*ranks, dtype=dtype)
    factors = [torch.linalg.qr(torch.randn(n, r, dtype=dtype))[0] for n, r in zip(shape, ranks)]
    x = tl.tucker_to_tensor((core, factors))
    return x + noise * x.norm() / math.sqrt(x.numel()) * torch.randn(*shape, dtype=dtype)


def assert_orthonormal(factor, atol=1e-6):
    eye = torch.eye(factor.shape[1], dtype=factor.dtype)
    torch.testing.assert_close(factor.T @ factor, eye, atol=atol, rtol=0)


# ---------------------------------------------------------------- HOOI
@pytest.mark.parametrize("shape,ranks", SHAPES_AND_RANKS)
@pytest.mark.parametrize("structured", [False, True])
# (11, 7) at ranks [3, 4] asks the reference for 4 vectors of a 7 x 3 unfolding: tensorly warns and
# keeps 3 (the 4th is free, its reconstruction no better), while ours still returns an orthonormal 7 x 4
@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs=4:UserWarning")
def test_hooi_no_worse_than_tensorly(shape, ranks, structured):
    x = low_rank_tucker(shape, [min(n, r + 2) for n, r in zip(shape, ranks)], noise=0.1) if structured \
        else torch.randn(*shape, dtype=torch.float64)
    ours = hooi(x, ranks)
    core, factors = tucker(x, rank=ranks, init="svd", n_iter_max=100, tol=1e-8)
    ref = rel_error(tl.tucker_to_tensor((core, factors)), x)
    assert rel_error(ours.to_tensor(), x) <= ref * 1.001 + 1e-12
    for f, n, r in zip(ours.factors, shape, ranks):
        assert f.shape == (n, r)
        assert_orthonormal(f, atol=1e-10)
    assert ours.core.shape == tuple(ranks)


@pytest.mark.parametrize("shape,ranks", SHAPES_AND_RANKS)
def test_hooi_recovers_exact_rank(shape, ranks):
    x = low_rank_tucker(shape, ranks)
    assert rel_error(hooi(x, ranks).to_tensor(), x) < 1e-10


@pytest.mark.parametrize("shape,_", SHAPES_AND_RANKS)
def test_hooi_full_rank_reproduces(shape, _):
    x = torch.randn(*shape, dtype=torch.float64)
    assert rel_error(hooi(x, list(shape)).to_tensor(), x) < 1e-12


def test_hooi_partial_modes_keep_other_dims():
    x = torch.randn(6, 10, 12, dtype=torch.float64)
    t = hooi(x, [4, 5], modes=[0, 2])
    assert t.core.shape == (4, 10, 5)
    assert [f.shape for f in t.factors] == [(6, 4), (12, 5)]
    assert t.shape == (6, 10, 12)
    # A partial Tucker at full rank on its modes is exact.
    assert rel_error(hooi(x, [6, 12], modes=[0, 2]).to_tensor(), x) < 1e-12


def test_hooi_deterministic_and_sign_convention():
    x = torch.randn(8, 9, 10)
    a, b = hooi(x, [3, 4, 5]), hooi(x.clone(), [3, 4, 5])
    assert torch.equal(a.core, b.core) and all(torch.equal(f, g) for f, g in zip(a.factors, b.factors))
    for f in a.factors:
        peak = f.abs().argmax(dim=0)
        assert (f[peak, torch.arange(f.shape[1])] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_hooi_low_precision_input_computes_in_float32(dtype):
    x = low_rank_tucker((10, 9, 8), (3, 3, 3), dtype=torch.float32)
    t = hooi(x.to(dtype), [3, 3, 3])
    assert t.core.dtype == dtype and all(f.dtype == dtype for f in t.factors)
    assert rel_error(t.to_tensor().float(), x) < 2e-2


def test_hooi_compute_dtype_float64_then_cast_back():
    x = torch.randn(7, 8, 9)
    t = hooi(x, [3, 3, 3], compute_dtype=torch.float64)
    assert t.core.dtype == torch.float32
    ref = hooi(x.double(), [3, 3, 3])
    torch.testing.assert_close(t.to_tensor(), ref.to_tensor().float(), atol=1e-5, rtol=1e-5)


def test_random_init_reaches_svd_init_error():
    x = low_rank_tucker((12, 10, 8), (4, 3, 3), noise=0.05)
    a = rel_error(hooi(x, [4, 3, 3], init="random").to_tensor(), x)
    b = rel_error(hooi(x, [4, 3, 3]).to_tensor(), x)
    assert a == pytest.approx(b, rel=1e-3)


# ---------------------------------------------------------------- TT-SVD
@pytest.mark.parametrize("shape,ranks", SHAPES_AND_RANKS)
def test_tt_svd_matches_tensorly_with_same_ranks(shape, ranks):
    x = torch.randn(*shape, dtype=torch.float64)
    internal = [min(r, math.prod(shape[: k + 1]), math.prod(shape[k + 1:])) for k, r in enumerate(ranks[:-1])]
    ours = tt_svd(x, max_rank=internal)
    ref = tl.tt_to_tensor(tensor_train(x, rank=[1, *internal, 1]))
    torch.testing.assert_close(ours.to_tensor(), ref, atol=1e-10, rtol=1e-10)
    assert ours.ranks == (1, *internal, 1)
    for core in ours.cores[:-1]:
        assert_orthonormal(core.reshape(-1, core.shape[2]), atol=1e-10)


@pytest.mark.parametrize("shape,_", SHAPES_AND_RANKS)
def test_tt_svd_exact_without_truncation(shape, _):
    x = torch.randn(*shape, dtype=torch.float64)
    assert rel_error(tt_svd(x).to_tensor(), x) < 1e-12
    assert rel_error(tt_svd(x, eps=1.0).to_tensor(), x) < 1e-12


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape,_", SHAPES_AND_RANKS)
def test_tt_svd_error_within_eps_bound(shape, _, eps):
    x = torch.randn(*shape, dtype=torch.float64)
    assert rel_error(tt_svd(x, eps=eps).to_tensor(), x) <= tt_error_bound(x.ndim, eps) + 1e-12


def test_tt_svd_eps_picks_fewest_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = (s ** 2).sum()
    assert energy_rank(s, 9 / total.item()) == 1
    assert energy_rank(s, 13 / total.item()) == 2
    assert energy_rank(s, 13.01 / total.item()) == 3
    assert energy_rank(s, 1.0) == 4


def test_tt_svd_recovers_exact_tt_rank():
    cores = [torch.randn(1, 5, 2, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64),
             torch.randn(3, 7, 1, dtype=torch.float64)]
    x = tt_to_tensor(cores)
    tt = tt_svd(x, eps=1.0 - 1e-14)
    assert tt.ranks == (1, 2, 3, 1)
    assert rel_error(tt.to_tensor(), x) < 1e-10


@pytest.mark.parametrize("shape", [(300, 257), (257, 300)])
def test_truncated_svd_gram_route_matches_thin_svd(shape):
    """Both sides >= GRAM_MIN_DIM: the Gram route gives the thin SVD's approximation, orthonormal Q."""
    from tmps.decompose._linalg import GRAM_MIN_DIM, truncated_svd
    assert min(shape) >= GRAM_MIN_DIM
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    q, s, r = truncated_svd(m, lambda s: 100)
    exact = torch.linalg.svd(m.double(), full_matrices=False)
    best = (exact.U[:, :100] * exact.S[:100]) @ exact.Vh[:100]
    assert q.shape == (shape[0], 100) and r.shape == (100, shape[1])
    assert torch.allclose(s.double(), exact.S, rtol=1e-4, atol=1e-4)
    assert rel_error((q @ r).double(), best) < 1e-5
    assert (q.T @ q - torch.eye(100)).abs().max() < 1e-4
    assert torch.all(q[q.abs().argmax(0), torch.arange(100)] > 0)  # sign convention


def test_truncated_svd_falls_back_to_svd_when_gram_would_lose_orthogonality():
    """A kept singular value far below the top one (1e-4) in float32 takes the exact SVD route."""
    from tmps.decompose._linalg import truncated_svd
    gen = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(280, 280, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, -6, 280, dtype=torch.float64)
    m = ((u[:, :280] * s) @ v.T).float()
    q, _, _ = truncated_svd(m, lambda s: 120)  # sigma_120 ~ 1e-2.6 of sigma_1: Gram loses it
    assert (q.T @ q - torch.eye(120)).abs().max() < 1e-4


def test_tt_svd_large_float32_matches_tensorly():
    """Unfoldings above GRAM_MIN_DIM (the Gram route): same error as tensorly's tensor_train."""
    x = torch.randn(3, 260, 270, generator=torch.Generator().manual_seed(5))
    ours = tt_svd(x, max_rank=[3, 130])
    ref = tl.tt_to_tensor(tensor_train(x, rank=[1, 3, 130, 1]))
    assert abs(rel_error(ours.to_tensor(), x) - rel_error(ref, x)) < 1e-5
    middle = ours.cores[1].reshape(-1, 130)
    assert (middle.T @ middle - torch.eye(130)).abs().max() < 1e-4


# ---------------------------------------------------------------- Tucker-MPS
def test_default_tensor_shape():
    assert default_tensor_shape(768, 768) == (64, 64, 144)
    assert default_tensor_shape(576, 576) == (64, 64, 81)
    assert default_tensor_shape(7, 11) == (7, 1, 11)
    m, n = 300, 500
    a, b, c = default_tensor_shape(m, n)
    assert a * b * c == m * n


def test_tucker_mps_full_ranks_exact_and_alias():
    w = torch.randn(24, 30, dtype=torch.float64)
    shape = default_tensor_shape(24, 30)
    result = tucker_mps(w, mps_eps=1.0, hooi_ranks=shape)
    assert rel_error(result.to_matrix(), w) < 1e-10
    alias = combined_mps_hooi_compression(w, mps_eps=1.0, hooi_ranks=shape)
    torch.testing.assert_close(alias.to_matrix(), result.to_matrix())


def test_tucker_mps_ratio_counts_parameters_kept():
    w = torch.randn(768, 768)
    result = tucker_mps(w, mps_eps=0.99, hooi_ranks=[6, 6, 8])
    r1, r2, r3 = result.ranks
    assert result.num_parameters() == r1 * r2 * r3 + 64 * r1 + 64 * r2 + 144 * r3
    assert result.compression_ratio() == pytest.approx(result.num_parameters() / 768 ** 2)
    for f in result.tucker.factors:
        assert_orthonormal(f, atol=1e-4)


def test_tucker_mps_more_energy_never_worse():
    structured = low_rank_tucker((16, 16, 36), (6, 6, 8), noise=0.3).reshape(96, 96)
    errors = [rel_error(tucker_mps(structured, eps, [6, 6, 8]).to_matrix(), structured) for eps in (0.5, 0.9, 1.0)]
    assert errors[0] >= errors[1] - 1e-9 >= errors[2] - 2e-9


@pytest.mark.parametrize(
    "eps,ranks",
    [(0.99, [6, 6, 8]), (0.95, [5, 5, 6]), (0.90, [4, 4, 5])],
)
def test_prototype_table_configurations_measured(eps, ranks):
    """The prototype's three configurations on a 768×768 matrix: ranks as asked, ratio ≈ 0.003-0.004."""
    w = torch.randn(768, 768)
    result = tucker_mps(w, mps_eps=eps, hooi_ranks=ranks)
    assert result.ranks == tuple(ranks)
    assert result.compression_ratio() < 0.005  # not the prototype's claimed 0.25-0.50
    assert 0.0 < rel_error(result.to_matrix(), w) < 1.0


# ---------------------------------------------------------------- activation-aware low rank
def test_weighted_svd_beats_plain_svd_in_output_error():
    n, m, tokens = 32, 24, 500
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    x = torch.randn(tokens, n, dtype=torch.float64) * scales
    w = torch.randn(m, n, dtype=torch.float64)
    cov = x.T @ x
    a, b = weighted_svd(w, input_metric(cov), rank=6)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :6] * s[:6]) @ vh[:6]
    assert relative_output_error(w, a @ b.T, cov) < 0.5 * relative_output_error(w, plain, cov)
    # It is the optimum: the output error equals the tail of the whitened spectrum.
    sw = torch.linalg.svdvals(input_metric(cov).whiten(w))
    expected = torch.sqrt((sw[6:] ** 2).sum() / (sw ** 2).sum()).item()
    assert relative_output_error(w, a @ b.T, cov) == pytest.approx(expected, rel=1e-6)


def test_weighted_svd_full_rank_exact_with_rank_deficient_covariance():
    x = torch.randn(5, 12, dtype=torch.float64)  # 5 tokens, 12 features: covariance of rank 5
    w = torch.randn(8, 12, dtype=torch.float64)
    a, b = weighted_svd(w, input_metric(x.T @ x), rank=8)
    torch.testing.assert_close(a @ b.T, w, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: hooi(x, [4, 4, 20]), "exceeds the dimension"),
        (lambda x: hooi(x, [0, 2, 2]), "positive"),
        (lambda x: hooi(x, [2, 2]), "entries but 3 are needed"),
        (lambda x: hooi(x, [2, 2], modes=[0, 5]), "not a mode"),
        (lambda x: hooi(x, [2, 2, 2], init="nope"), "init"),
        (lambda x: tt_svd(x, eps=0.0), r"outside \(0, 1\]"),
        (lambda x: tt_svd(x, eps=1.5), r"outside \(0, 1\]"),
        (lambda x: tt_svd(x, max_rank=[2]), "internal ranks"),
        (lambda x: tucker_mps(x[0], mps_eps=1.2), "mps_eps"),
        (lambda x: tucker_mps(x[0], hooi_ranks=[2, 2]), "hooi_ranks has 2 entries"),
        (lambda x: tucker_mps(x, mps_eps=0.9), "needs a matrix"),
        (lambda x: tucker_mps(x[0], tensor_shape=(2, 2, 2)), "product"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(6, 7, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_rejected(bad):
    x = torch.randn(4, 5, 6)
    x[1, 2, 3] = bad
    for call in (lambda: hooi(x, [2, 2, 2]), lambda: tt_svd(x, eps=0.9), lambda: tucker_mps(x[1])):
        with pytest.raises(ValueError, match="NaN/Inf"):
            call()


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating"):
        hooi(torch.ones(3, 3, dtype=torch.int64), [2, 2])


def test_tucker_mps_without_eps_keeps_a_tiny_tail_that_eps_one_drops():
    """``mps_eps=None`` leaves the ranks to ``hooi_ranks``: at full ranks the result is exact even where
    a direction's energy share is below ENERGY_SLACK (eps = 1.0 counts such a tail as noise)."""
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    x = torch.einsum("ij,j,jkl->ikl", u, torch.tensor([1.0, 1, 1, 1, 1, 1e-7], dtype=torch.float64), x)
    exact, ranks = tucker_mps_tensor(x, None, [6, 4, 5])
    assert ranks[0] == 6 and rel_error(tucker_to_tensor(exact), x) < 1e-12
    noisy, ranks = tucker_mps_tensor(x, 1.0, [6, 4, 5])
    assert ranks[0] == 5 and rel_error(tucker_to_tensor(noisy), x) > 1e-9
