"""Fused factor-core-factor projection against its float64 torch reference.

On a machine without CUDA the kernel runs in Triton's interpreter (see conftest.py).
"""

import pytest
import torch

from tmps.kernels import fused_projection as fp
from tmps.kernels import _common
from tmps.kernels._common import autotune
from tmps.kernels.fused_projection import (
    FusedProjection,
    KernelConfig,
    fused_factored_projection,
    fused_factored_projection_ref,
    triton_available,
)

DEVICE = "cuda" if torch.cuda.is_available() and not fp._interpreted() else "cpu"
needs_kernel = pytest.mark.skipif(not triton_available(DEVICE), reason=f"Triton cannot run on {DEVICE}")

# Tolerance on max|error| relative to max|reference|.  16-bit runs round z, t and y to the input
# dtype (three roundings of unit size 2**-11 or 2**-8) on top of fp32 accumulation; fp32 runs as
# 3xTF32 on the GPU (exact fp32 products in the interpreter).
TOLERANCE = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}

# Group layouts: (n_heads, s, o) per group, o None for an absent out factor; bias flags per group.
# The model-like ones keep the head counts of the real models and shrink the widths.
LAYOUTS = {
    # Llama GQA: 9 query heads, 3 key/value heads, out factors to head_dim 32, no biases
    "llama_gqa": dict(groups=[(9, "s", 32), (3, "s", 32), (3, "s", 32)], bias=[False, False, False]),
    # OPT: three equal groups with out factors and biases
    "opt": dict(groups=[(4, "s", 32), (4, "s", 32), (4, "s", 32)], bias=[True, True, True]),
    # k and v stored as latents (no out factor); only q has a bias
    "kv_latent": dict(groups=[(6, "s", 32), (2, "s", None), (2, "s", None)], bias=[True, False, False]),
    # s equal to head_dim 64 with an out factor present
    "s_eq_head_dim": dict(groups=[(2, 64, 64), (1, 64, 64)], bias=[True, False]),
    # one group
    "single": dict(groups=[(3, "s", None)], bias=[True]),
    # Gemma 3's weights mode: head_dim 256 (4 query heads, 1 key/value head), no out factor, no bias
    "gemma3": dict(groups=[(4, 256, None), (1, 256, None), (1, 256, None)], bias=[False, False, False]),
    # kv mode as tmps.compress builds it (no in factor): dense per-head Q, K and V latents of one
    # wide "head" each; OPT's biases on all three
    "kv_model": dict(groups=[(6, 32, None), (1, 24, None), (1, 40, None)], bias=[True, True, True]),
    # kv mode on a model with per-head key norms (Qwen3, Gemma 3): full key heads out (the norm and the
    # key basis follow), the V latent; no biases
    "kv_normed_model": dict(groups=[(4, 16, None), (2, 16, None), (1, 24, None)], bias=[False, False, False]),
}
# the layouts tmps.compress builds in kv mode, which have no in factor (z = x)
NO_IN_FACTOR_LAYOUTS = ("kv_model", "kv_normed_model")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(m_shape, d_in, r, s, layout, dtype, with_in_factor=True):
    """Random inputs scaled so that every stage is O(1); rounded to ``dtype`` once.

    ``with_in_factor=False``: no in factor (``z = x``), the cores act on ``d_in`` (``r`` is ignored)."""
    spec = LAYOUTS[layout]
    x = torch.randn(*m_shape, d_in, dtype=torch.float64)
    in_factor = torch.randn(d_in, r, dtype=torch.float64) / d_in**0.5 if with_in_factor else None
    r = r if with_in_factor else d_in
    cores, out_factors, biases = [], [], []
    for (n, s_g, o), has_bias in zip(spec["groups"], spec["bias"]):
        s_g = s if s_g == "s" else s_g
        cores.append(torch.randn(n, s_g, r, dtype=torch.float64) / r**0.5)
        out_factors.append(None if o is None else torch.randn(o, s_g, dtype=torch.float64) / s_g**0.5)
        biases.append(torch.randn(n * (o or s_g), dtype=torch.float64) if has_bias else None)

    def cast(t):
        return None if t is None else t.to(device=DEVICE, dtype=dtype)

    return (cast(x), cast(in_factor), [cast(c) for c in cores], [cast(a) for a in out_factors],
            [cast(b) for b in biases])


def reference(x, in_factor, cores, out_factors, biases):
    """The torch reference on float64 copies of exactly the kernel's inputs."""

    def f64(t):
        return None if t is None else t.double().cpu()

    return fused_factored_projection_ref(f64(x), f64(in_factor), [f64(c) for c in cores],
                                         [f64(a) for a in out_factors], [f64(b) for b in biases])


def assert_close_to_ref(actual, expected, rel, name="output"):
    """max-relative check that reports the first mismatching index (NaN counts as a mismatch)."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    actual = actual.double().cpu()
    bound = rel * expected.abs().max().item() + 1e-12
    bad = ~((actual - expected).abs() <= bound)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off by more than {bound:.3g} "
            f"(rel {rel:g} of max|ref|); first at index {first}: got {actual[first].item()!r}, "
            f"expected {expected[first].item()!r}"
        )


def check(inputs, dtype, out=None, config=None):
    ys = fused_factored_projection(*inputs, out=out, config=config)
    refs = reference(*inputs)
    assert len(ys) == len(refs)
    for g, (y, ref) in enumerate(zip(ys, refs)):
        assert y.dtype == dtype and y.device.type == DEVICE
        assert_close_to_ref(y, ref, TOLERANCE[dtype], name=f"group {g}")
    return ys


def nan_outputs(inputs, lead):
    x, _, cores, out_factors, _ = inputs
    widths = [c.shape[0] * (c.shape[1] if a is None else a.shape[0]) for c, a in zip(cores, out_factors)]
    return [torch.full((*lead, w), float("nan"), device=DEVICE, dtype=x.dtype) for w in widths]


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("layout", ["llama_gqa", "opt", "gemma3"])
@pytest.mark.parametrize("r", [24, 40, 96])
@pytest.mark.parametrize("m", [1, 7, 129])
def test_fp32_matches_reference(m, r, layout):
    check(make_inputs((m,), 48, r, 24 if layout == "llama_gqa" else 40, layout, torch.float32), torch.float32)


@needs_kernel
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in NO_IN_FACTOR_LAYOUTS])  # those: below
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_reference(dtype, layout):
    check(make_inputs((33,), 64, 40, 24, layout, dtype), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["kv_latent", "s_eq_head_dim"])
def test_leading_dims_and_preallocated_out(layout, dtype):
    inputs = make_inputs((2, 5), 40, 24, 40, layout, dtype)
    out = nan_outputs(inputs, (2, 5))
    ys = check(inputs, dtype, out=out)
    assert all(y is o for y, o in zip(ys, out))


@needs_kernel
def test_out_as_strided_views_of_a_packed_buffer():
    inputs = make_inputs((2, 7), 32, 40, 24, "llama_gqa", torch.float32)
    widths = [9 * 32, 3 * 32, 3 * 32]
    packed = torch.full((2, 7, sum(widths) + 5), float("nan"), device=DEVICE)  # +5: padded row stride
    out = list(packed[..., : sum(widths)].split(widths, dim=-1))
    check(inputs, torch.float32, out=out)
    assert packed[..., sum(widths):].isnan().all(), "wrote past the views"


# Tiling variants, each on a layout with and without out factors.  The interpreter config walks all
# column tiles in one program; these cover one tile per program, splits that cut through groups,
# tiles narrower than one head, and z in scratch with several (masked) r chunks.
CONFIGS = {
    "one_tile_per_program": KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=16, block_r=16,
                                         num_stages=1),
    "splits_across_groups": KernelConfig(block_m=16, block_t=32, col_splits=3, block_k=32, block_r=16,
                                         num_stages=1),
    "z_in_scratch": KernelConfig(block_m=16, block_t=128, col_splits=2, block_k=16, block_r=16,
                                 num_stages=1, z_in_regs=False),
    # z = x @ B by torch first, the tiles read it: 40 = 2.5 r chunks of 16, 37 rows = 3 row tiles
    "z_pass": KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=16, block_r=16, num_stages=1,
                           z_pass=True),
}


@needs_kernel
@pytest.mark.parametrize("layout", ["llama_gqa", "kv_latent"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_tiling_variants(config, layout):
    inputs = make_inputs((37,), 40, 40, 24, layout, torch.float32)
    check(inputs, torch.float32, out=nan_outputs(inputs, (37,)), config=CONFIGS[config])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 129])
def test_z_pass_in_half_precision(m, dtype):
    inputs = make_inputs((m,), 40, 96, 24, "opt", dtype)
    config = KernelConfig(block_m=16 if m == 1 else 32, block_t=32, col_splits=0, block_k=32, block_r=32,
                          num_stages=1, z_pass=True)
    check(inputs, dtype, out=nan_outputs(inputs, (m,)), config=config)


def test_z_pass_excludes_z_in_registers():
    with pytest.raises(ValueError, match="z_pass"):
        KernelConfig(z_pass=True, z_in_regs=True)


# Without an in factor (kv mode's layout) the kernel reads x as z: z-pass configs only, flat tiles
# over each latent group's columns.  d_in = 40: 2.5 r chunks of 16; block_t 16: the 24 / 40-wide
# latents end inside a tile; col_splits 3 cuts through groups.
NO_IN_FACTOR_CONFIGS = {
    "flat_16": KernelConfig(block_m=16, block_t=16, col_splits=0, block_k=16, block_r=16, num_stages=1, z_pass=True),
    "flat_64": KernelConfig(block_m=16, block_t=64, col_splits=0, block_k=16, block_r=32, num_stages=1, z_pass=True),
    "splits": KernelConfig(block_m=32, block_t=32, col_splits=3, block_k=16, block_r=16, num_stages=1, z_pass=True),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 7, 129])
@pytest.mark.parametrize("layout", NO_IN_FACTOR_LAYOUTS)
def test_no_in_factor_matches_reference(layout, m, dtype):
    inputs = make_inputs((m,), 40, None, 24, layout, dtype, with_in_factor=False)
    assert inputs[1] is None
    # the interpreter takes the launcher's own pick; on a GPU one fixed config keeps the compile count
    # down (the autotuner would compile every z-pass candidate per dtype; gpu_check c3 covers it)
    config = None if DEVICE == "cpu" else NO_IN_FACTOR_CONFIGS["flat_64"]
    check(inputs, dtype, out=nan_outputs(inputs, (m,)), config=config)


@needs_kernel
@pytest.mark.parametrize("layout", ["kv_model", "kv_latent", "llama_gqa"])
@pytest.mark.parametrize("config", list(NO_IN_FACTOR_CONFIGS))
def test_no_in_factor_tilings(config, layout):
    inputs = make_inputs((37,), 40, None, 24, layout, torch.float32, with_in_factor=False)
    check(inputs, torch.float32, out=nan_outputs(inputs, (37,)), config=NO_IN_FACTOR_CONFIGS[config])


@needs_kernel
def test_no_in_factor_reads_strided_rows():
    x, _, cores, outs, biases = make_inputs((5,), 40, None, 24, "kv_model", torch.float16, with_in_factor=False)
    wide = torch.full((5, 48), float("nan"), device=DEVICE, dtype=torch.float16)
    wide[:, :40] = x  # rows 48 apart: the kernel must not read x's storage as a (5, 40) matrix
    check((wide[:, :40], None, cores, outs, biases), torch.float16)


@needs_kernel
def test_no_in_factor_refuses_a_config_that_computes_z():
    inputs = make_inputs((3,), 40, None, 24, "kv_model", torch.float32, with_in_factor=False)
    with pytest.raises(ValueError, match="z-pass"):
        fused_factored_projection(*inputs, config=CONFIGS["one_tile_per_program"])


@needs_kernel
def test_empty_rows():
    inputs = make_inputs((0,), 16, 24, 24, "opt", torch.float32)
    ys = fused_factored_projection(*inputs)
    assert [tuple(y.shape) for y in ys] == [(0, 128)] * 3


def test_reference_matches_dense_weights():
    """The reference equals x @ Wᵀ + b with W_g[h*o + j] = Σ_s A[j, s] · core[h, s] · Bᵀ."""
    x, in_factor, cores, out_factors, biases = make_inputs((3, 5), 16, 24, 40, "kv_latent", torch.float64)
    refs = fused_factored_projection_ref(x, in_factor, cores, out_factors, biases)
    for core, a, b, y in zip(cores, out_factors, biases, refs):
        per_head = torch.einsum("hsr,dr->hsd", core, in_factor)  # (n, s, d_in)
        if a is not None:
            per_head = torch.einsum("os,hsd->hod", a, per_head)
        weight = per_head.reshape(-1, x.shape[-1])
        torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b))


def test_runs_in_interpreter_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("compiled kernels run on the GPU")
    assert fp._interpreted(), (
        "Triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so the kernel "
        "tests were skipped; run with TRITON_INTERPRET=1 in the environment or set it in tests/conftest.py"
    )
    assert triton_available("cpu")


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def _good():
    return make_inputs((4,), 16, 24, 24, "kv_latent", torch.float32)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(in_factor=a["in_factor"][:-1]), r"in_factor has shape \(15, 24\), expected \(d_in=16, r\)"),
        (lambda a: a["cores"].__setitem__(1, a["cores"][1][:, :, :-1]),
         r"cores\[1\] has shape \(2, 24, 23\), expected \(n_heads, s, r=24\)"),
        (lambda a: a["cores"].__setitem__(0, a["cores"][0][0]), r"cores\[0\] has shape \(24, 24\)"),
        (lambda a: a["out_factors"].__setitem__(0, a["out_factors"][0][:, :-1]),
         r"out_factors\[0\] has shape \(32, 23\), expected \(o, s=24\)"),
        (lambda a: a["biases"].__setitem__(0, a["biases"][0][:-1]),
         r"biases\[0\] has shape \(191,\), expected \(192,\)"),
        (lambda a: a["biases"].append(None), r"equal lengths, got 3, 3 and 4"),
        (lambda a: a["out_factors"].pop(), r"equal lengths, got 3, 2 and 3"),
        (lambda a: a.update(cores=[], out_factors=[], biases=[]), r"1 to 4 groups, got 0"),
        (lambda a: a.update(cores=a["cores"] * 2, out_factors=a["out_factors"] * 2, biases=a["biases"] * 2),
         r"1 to 4 groups, got 6"),
    ],
    ids=["in_factor", "core_rank", "core_dims", "out_factor", "bias", "len_biases", "len_out_factors", "no_groups",
         "too_many_groups"],
)
def test_bad_shapes_raise_value_error(mutate, match):
    x, in_factor, cores, out_factors, biases = _good()
    args = dict(x=x, in_factor=in_factor, cores=cores, out_factors=out_factors, biases=biases)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        fused_factored_projection(**args)


def test_mismatched_dtypes_raise_type_error():
    x, in_factor, cores, out_factors, biases = _good()
    cores[2] = cores[2].half()
    with pytest.raises(TypeError, match=r"x=torch.float32.*cores\[2\]=torch.float16"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases)


def test_unsupported_dtype_raises_type_error():
    x, in_factor, cores, out_factors, biases = make_inputs((4,), 16, 24, 24, "single", torch.float64)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases)


def test_non_tensor_raises_type_error():
    x, in_factor, cores, out_factors, biases = _good()
    with pytest.raises(TypeError, match=r"cores\[0\] must be a torch.Tensor"):
        fused_factored_projection(x, in_factor, [None] + cores[1:], out_factors, biases)


def test_mismatched_device_raises_value_error():
    x, in_factor, cores, out_factors, biases = _good()
    with pytest.raises(ValueError, match=r"in_factor is on meta but x is on"):
        fused_factored_projection(x, in_factor.to("meta"), cores, out_factors, biases)


def test_bad_out_raises():
    x, in_factor, cores, out_factors, biases = _good()
    out = [torch.empty(4, w, device=DEVICE) for w in (192, 48, 48)]
    with pytest.raises(ValueError, match="out must be a list of 3 tensors"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases, out=out[:2])
    with pytest.raises(ValueError, match=r"out\[1\] has shape \(4, 47\), expected \(4, 48\)"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases, out=[out[0], out[1][:, :-1], out[2]])
    with pytest.raises(TypeError, match=r"out\[2\] has dtype torch.float16"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases, out=out[:2] + [out[2].half()])
    with pytest.raises(ValueError, match=r"out\[0\] with strides \(1, 4\)"):
        fused_factored_projection(x, in_factor, cores, out_factors, biases,
                                  out=[torch.empty(192, 4, device=DEVICE).T] + out[1:])


# --------------------------------------------------------------------------------------------
# FusedProjection: factors checked once, then only x
# --------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("layout", ["opt", "kv_latent"])
def test_launcher_reused_across_inputs_matches_the_reference(layout):
    x, in_factor, cores, out_factors, biases = make_inputs((5,), 32, 24, 24, layout, torch.float16)
    launcher = FusedProjection(in_factor, cores, out_factors, biases, like=x)
    assert not launcher.copied
    for shape in [(5,), (2, 7), (1,)]:  # new inputs, new leading shapes, one launcher
        x = torch.randn(*shape, 32, device=DEVICE).half()
        outs = nan_outputs((x, in_factor, cores, out_factors, biases), shape)
        ys = launcher(x, outs)
        assert all(y is o for y, o in zip(ys, outs))
        for g, (y, ref) in enumerate(zip(ys, reference(x, in_factor, cores, out_factors, biases))):
            assert_close_to_ref(y, ref, TOLERANCE[torch.float16], name=f"{shape} group {g}")


@needs_kernel
def test_launcher_sees_in_place_factor_updates():
    """Contiguous factors are held, not copied: ``load_state_dict`` (an in-place copy) needs no new launcher."""
    x, in_factor, cores, out_factors, biases = make_inputs((3,), 32, 24, 24, "opt", torch.float32)
    launcher = FusedProjection(in_factor, cores, out_factors, biases, like=x)
    with torch.no_grad():
        cores[1].mul_(-2.0)
        biases[2].add_(1.0)
    for g, (y, ref) in enumerate(zip(launcher(x), reference(x, in_factor, cores, out_factors, biases))):
        assert_close_to_ref(y, ref, TOLERANCE[torch.float32], name=f"group {g}")


def test_launcher_copies_non_contiguous_factors_and_says_so():
    x, in_factor, cores, out_factors, biases = _good()
    assert not FusedProjection(in_factor, cores, out_factors, biases, like=x).copied
    strided = in_factor.T.contiguous().T  # same values, column-major
    launcher = FusedProjection(strided, cores, out_factors, biases, like=x)
    assert launcher.copied and launcher.in_factor.is_contiguous()


def test_launcher_checks_each_input_against_its_factors():
    x, in_factor, cores, out_factors, biases = _good()
    launcher = FusedProjection(in_factor, cores, out_factors, biases, like=x)
    with pytest.raises(TypeError, match=r"x has dtype torch.float16 but the factors are torch.float32"):
        launcher(x.half())
    with pytest.raises(ValueError, match=r"x has shape \(4, 15\), expected \(\.\.\., d_in=16\)"):
        launcher(x[:, :-1])
    with pytest.raises(ValueError, match=r"x is on meta but the factors are on"):
        launcher(x.to("meta"))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        launcher([1.0] * 16)
    with pytest.raises(ValueError, match=r"cores\[1\] has shape"):  # the factors are checked at construction
        FusedProjection(in_factor, [cores[0], cores[1][:, :, :-1], cores[2]], out_factors, biases, like=x)




def test_factor_checks_run_once_per_signature_and_never_hide_an_error(monkeypatch):
    """The compiled graph's op builds a launcher per call: the checks are kept per shapes, dtypes and
    devices, so new tensors of known shapes skip them, and anything else is checked in full."""
    calls = []
    real = fp._validate
    monkeypatch.setattr(fp, "_validate", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fp, "_CHECKED", {})
    x, in_factor, cores, out_factors, biases = _good()
    FusedProjection(in_factor, cores, out_factors, biases, like=x)
    fresh = [t.clone() if t is not None else None for t in (x, in_factor, *cores, *out_factors, *biases)]
    FusedProjection(fresh[1], fresh[2:5], fresh[5:8], fresh[8:], like=fresh[0])  # same signature
    assert len(calls) == 1
    FusedProjection(in_factor, cores, out_factors, biases, like=x[:2])  # x's rows do not count
    assert len(calls) == 1
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):  # another dtype: another verdict
        FusedProjection(in_factor, cores, out_factors, biases, like=x.double())
    assert len(calls) == 2
    cores[1].data = cores[1].data[:, :, :-1]  # same tensor object, new shape: checked again, and refused
    with pytest.raises(ValueError, match=r"cores\[1\] has shape \(2, 24, 23\)"):
        FusedProjection(in_factor, cores, out_factors, biases, like=x)
    with pytest.raises(ValueError, match=r"cores\[1\] has shape \(2, 24, 23\)"):  # a failure is not kept
        FusedProjection(in_factor, cores, out_factors, biases, like=x)
    assert len(calls) == 4


# --------------------------------------------------------------------------------------------
# Config space (no launches)
# --------------------------------------------------------------------------------------------


def test_autotune_keeps_fastest_fitting_config():
    pytest.importorskip("triton")
    times = {c: float(i) for i, c in enumerate(fp._PREFILL_CONFIGS)}
    too_big = fp._PREFILL_CONFIGS[0]

    def run(config):
        if config is too_big:
            raise _common.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return times[config]

    assert autotune(fp._PREFILL_CONFIGS, run, lambda fn: fn()) is fp._PREFILL_CONFIGS[1]
    assert autotune([too_big], run, lambda fn: fn()) is None


def test_alignment_hint_only_where_every_size_is_a_multiple_of_8_and_some_not_of_16():
    """The kernels restate such sizes as (n // 8) * 8 so that Triton sees them 16-byte aligned (it
    specializes only multiples of 16); a hint on a size that is not a multiple of 8 would change it."""
    assert _common.alignment(712, 712 * 1040, 1328) == 8  # kv mode's r_k at OPT-1.3B
    assert _common.alignment(1024, 2048) == 1  # Triton's own specialization covers these
    assert _common.alignment(712, 717) == 1  # an unaligned rank: no hint at all
    assert _common.alignment(24, 0) == 8  # absent strides pass 0


@needs_kernel
@pytest.mark.parametrize("r", [24, 32, 44])  # hint 8, Triton's 16, none
def test_projection_is_exact_whatever_the_rank_alignment(r):
    x, in_factor, cores, out_factors, biases = make_inputs((5,), 16, r, 24, "opt", torch.float32)
    for g, (y, ref) in enumerate(zip(fused_factored_projection(x, in_factor, cores, out_factors, biases),
                                     reference(x, in_factor, cores, out_factors, biases))):
        assert_close_to_ref(y, ref, TOLERANCE[torch.float32], name=f"r={r} group {g}")


def test_tuners_time_decode_sizes_on_the_device_and_prefill_eagerly(monkeypatch):
    """At decode sizes an eager timing is mostly the host's launch; the tuners time those candidates
    in device time (CUDA graphs), and fall back to the eager median where no graph can be captured."""
    pytest.importorskip("triton")
    from tmps.kernels import latent_decode, latent_scores

    assert fp._tuning_bench(1) is fp._tuning_bench(16) is _common.decode_bench
    assert fp._tuning_bench(17) is fp._tuning_bench(4096) is _common.eager_ms
    assert latent_decode.decode_bench is latent_scores.decode_bench is _common.decode_bench

    timed = []
    monkeypatch.setattr(_common, "eager_ms", lambda fn: timed.append("eager") or 0.5)
    monkeypatch.setattr(_common, "device_ms", lambda fn, flush_bytes: timed.append(("device", flush_bytes)) or 0.02)
    assert _common.decode_bench(lambda: None) == 0.02 and timed == [("device", 256 << 20)]  # L2 flushed

    def no_capture(fn, flush_bytes):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(_common, "device_ms", no_capture)
    assert _common.decode_bench(lambda: None) == 0.5 and timed[-1] == "eager"

    def too_big(fn, flush_bytes):  # a config that does not fit is skipped by autotune, not timed eagerly
        raise _common.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(_common, "device_ms", too_big)
    assert autotune(fp._DECODE_CONFIGS[:2], lambda config: None, _common.decode_bench) is None
    assert timed[-1] == "eager" and len(timed) == 2


@pytest.mark.parametrize("m", [1, 16, 17, 4096])
def test_pruned_configs_cover_every_group_once(m):
    pytest.importorskip("triton")
    groups = ((9, 24, 64, True, False), (3, 24, 64, True, False), (3, 40, 40, False, True))
    configs = fp._prune_configs(fp._DECODE_CONFIGS if m <= 16 else fp._PREFILL_CONFIGS, m, 96, groups)
    assert configs
    for config in configs:
        plan = fp._make_plan(config, 96, groups)
        tiles = plan.tile_start[-1]
        assert plan.col_splits * plan.tiles_per_program >= tiles > (plan.col_splits - 1) * plan.tiles_per_program
        for n, hpt, lo, hi in zip(plan.heads, plan.heads_per_tile, plan.tile_start, plan.tile_start[1:]):
            assert (hi - lo) * hpt >= n > (hi - lo - 1) * hpt  # every head in exactly one tile
        # a flat group (no out factor): virtual heads of the tile width cover its columns once
        heads, width, cols = plan.heads[2], plan.s[2], plan.cols[2]
        assert plan.heads_per_tile[2] == 1 and heads * width >= cols == 120 > (heads - 1) * width


# --------------------------------------------------------------------------------------------
# In a compressed model
# --------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_kv_mode_projection_runs_through_the_kernel(arch, monkeypatch):
    """kv mode's Q / K-latent / V-latent projection (no in factor) is one kernel launch per layer;
    at full rank the compressed model still reproduces the dense logits."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    import tmps
    from tmps import kernels_bridge as bridge
    from tmps.projection import FactoredProjection

    if arch == "opt":
        cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32)
        dense = OPTForCausalLM(cfg).eval()
    else:
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        dense = LlamaForCausalLM(cfg).eval()
    model = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode="kv", ratio=1.0, progress=False)
    projections = [m for m in model.modules() if isinstance(m, FactoredProjection)]
    assert len(projections) == cfg.num_hidden_layers and all(p.in_factor is None for p in projections)
    model, dense = model.to(DEVICE), dense.to(DEVICE)
    calls = []
    kernel = bridge.run_fused_projection
    monkeypatch.setattr(bridge, "run_fused_projection", lambda *a: calls.append(1) or kernel(*a))
    tmps.set_paths(model, backend="triton")
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert len(calls) == cfg.num_hidden_layers
    assert_close_to_ref(got, want.double().cpu(), 1e-4, name="logits")


@pytest.mark.skipif(DEVICE != "cuda", reason="the tuner times candidates on CUDA only")
def test_tuned_config_is_read_back_from_the_tuning_cache(tmp_path, monkeypatch):
    """With TMPS_TUNING_CACHE set, the winner tuned here is written down (keyed by this GPU's name)
    and a later process, its table empty, launches with it untimed: the same outputs."""
    from tmps.tuning_cache import TunedChoices

    monkeypatch.setenv("TMPS_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(fp, "_TUNED", TunedChoices("fused_projection", fp.KernelConfig))
    inputs = make_inputs((5,), 64, 40, 24, "llama_gqa", torch.float16)
    first = check(inputs, torch.float16)
    (key, config), = dict.items(fp._TUNED)
    assert isinstance(key[0], torch.device)
    monkeypatch.setattr(fp, "_TUNED", TunedChoices("fused_projection", fp.KernelConfig))
    monkeypatch.setattr(fp, "autotune", lambda *args, **kwargs: pytest.fail("tuned again"))
    again = check(inputs, torch.float16)
    assert dict.get(fp._TUNED, key) == config
    assert all(torch.equal(a, b) for a, b in zip(first, again))
