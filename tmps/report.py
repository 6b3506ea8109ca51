"""``tmps.report``: what a compressed model holds, per layer, as a table."""
from __future__ import annotations


def summary(info: dict) -> dict:
    """Totals over layers: parameters kept, KV cache kept, mean calibration error."""
    layers = info["layers"]
    kept = sum(l["qkv_parameters"] for l in layers)
    dense = sum(l["dense_qkv_parameters"] for l in layers)
    return {
        "qkv_parameters": kept,
        "dense_qkv_parameters": dense,
        "qkv_parameters_kept": kept / dense,
        "kv_cache_kept": sum(l["kv_cache_kept"] for l in layers) / len(layers),
        "qkv_flops_kept": sum(l["qkv_flops_per_token"] for l in layers) / sum(l["dense_qkv_flops_per_token"] for l in layers),
        "mean_calibration_error": sum(l["calibration_error"] for l in layers) / len(layers),
    }


def report(model_or_info) -> str:
    """A text table: one row per layer (ranks, Q/K/V parameters kept, KV cache kept, calibration error), then totals."""
    info = getattr(model_or_info, "tmps_info", model_or_info)
    if not isinstance(info, dict) or "layers" not in info:
        raise ValueError("not a tmps-compressed model: call tmps.compress(model) or tmps.load(path) first")
    cfg = info["config"]
    lines = [f"tmps: mode={cfg['mode']} method={cfg['method']} ratio={cfg['ratio']} mps_eps={cfg['mps_eps']} "
             f"hooi_ranks={cfg['hooi_ranks']} error_budget={cfg['error_budget']}",
             f"{'layer':>5}  {'ranks':<24} {'QKV params':>12} {'kept':>6} {'KV kept':>8} {'calib err':>9}"]
    for i, l in enumerate(info["layers"]):
        ranks = ", ".join(f"{k}={v}" for k, v in l["ranks"].items())
        lines.append(f"{i:>5}  {ranks:<24} {l['qkv_parameters']:>12,} {l['qkv_parameters'] / l['dense_qkv_parameters']:>6.3f} "
                     f"{l['kv_cache_kept']:>8.3f} {l['calibration_error']:>9.4f}")
    s = summary(info)
    lines.append(f"{'total':>5}  {'':<24} {s['qkv_parameters']:>12,} {s['qkv_parameters_kept']:>6.3f} "
                 f"{s['kv_cache_kept']:>8.3f} {s['mean_calibration_error']:>9.4f}")
    return "\n".join(lines)
