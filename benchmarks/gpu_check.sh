#!/usr/bin/env bash
# One command for a GPU machine with no registry access: run it as is, from the repository root.
#
#   bash benchmarks/gpu_check.sh                 # results in ${OUT:-results}/
#
# Steps, each under its own `timeout`, each logged to $OUT/gpu_check.log; a failing or timed-out
# step is recorded and the next one still runs:
#   a. versions: python, GPU, torch, triton, transformers, numpy (and nvidia-smi)
#   b. imports without a registry: `pip install --no-deps --no-build-isolation --no-index -e .`
#      (tmps.kernels maps to kernels/ only through the installed package-dir, so a plain
#      PYTHONPATH checkout cannot import it); fallback: a tmps/kernels -> ../kernels link, removed
#      on exit
#   c. correctness on CUDA: c1 pytest tests/kernels (the kernel tests pick CUDA when it is there
#      and TRITON_INTERPRET is unset); c2 benchmarks/latent_decode_check.py (the latent decode kernel
#      at OPT-1.3B (b=1/16) and Llama-3-8B (RoPE) decode shapes over a masked 1040-slot cache) and
#      benchmarks/projection_check.py (the fused projection against float64 at model sizes:
#      fp32/fp16/bf16, 1/7/129/4096 tokens, Llama and OPT layouts); c3 benchmarks/full_rank_check.py
#      (tmps.compress at full rank on tiny Llama/OPT models, logits against dense, with the Triton
#      path counted; kv mode's cached steps also under torch.compile(fullgraph=True), the kernels as
#      custom ops). Each of these runs on the CPU too, under Triton's interpreter (no --device cuda)
#   d. benchmarks/kernel_microbench.py on a subset (hidden 4096, ratio GPU_CHECK_RATIOS (0.25),
#      no torch.compile; out_factor (the full factor-core-factor chain), weights_model and kv_model
#      (weights and kv mode's projections as tmps.compress builds them: the latter without an in
#      factor, one launch against three GEMMs), do_bench and CUDA-graph timings,
#      each row checked against the chain;
#      d2. benchmarks/latent_attention_bench.py: one kv decode step over the latent cache against
#      the dense cache and the rebuild (OPT-1.3B and Llama-3-8B shapes, batch 1/16, context 1k,
#      ranks unaligned and rounded to multiples of 8), torch chain vs the fused decode kernels,
#      eager and CUDA-graph device time
#   e. benchmarks/e2e.py (OPT-1.3B and OPT-6.7B shapes) with whatever time is left. Random factors
#      of uniform ranks by default (E2E_FACTORS=auto calibrates with tmps.compress first, 40 s per
#      variant at most: at these sizes it costs more of the budget than it tells about timing; c3
#      runs tmps.compress on CUDA). --kv-graphs: kv mode's latents do fit HF's StaticCache (the
#      CPU smoke run checks that its greedy tokens equal the eager decode's), so its graphs are tried.
#   d3. (after e: it compiles, slowly) torch.compile of the unfused chain at 1 and 4096 tokens
#      (weights_model layout: weights mode's), timed like d and merged into kernels.json / kernels.md
#   p. benchmarks/profile_step.py: the kernels of one static-cache decode step (dense, kv, weights;
#      OPT-1.3B shape, batch 16, context 1024) and of a 1x2048 prefill, device time per kernel
#      (profile.md); PROFILE_ARGS is appended to its arguments
#   f. (with what is left) pytest benchmarks/bench_attention.py --benchmark-only: one
#      attention block, dense vs weights/kv mode, torch vs kernel path, fp16 (its table in the log;
#      skipped when pytest-benchmark is not installed)
#   g. benchmarks/targets.py: issue #4's targets against kernels.json and e2e.json, worst case per
#      target (targets.md); a missed target is reported, not counted as a failed step
#
# Two parts (GPU_CHECK_PART), one device call each; every step's script rewrites its tables as it
# goes, so a step stopped by its cap still returns the rows it finished:
#   1 (default, 450 s): a b c1 c2 d d2 g -- is every kernel right on this GPU, and how fast is each
#      against cuBLAS dense, the torch chain and (d's graph rows) in device time. c1 and c2 run the
#      fused latent decode kernel on a GPU for the first time; d2 times the latent decode step at
#      unaligned and aligned ranks side by side (--align-ranks 1 8), torch chain against the fused
#      decode kernels, eagerly and in CUDA-graph device time.
#   2 (300 s): a b c3 e d3 p f g -- the compressed models on CUDA (c3), end to end against dense (e:
#      OPT-1.3B first, then OPT-6.7B, as far as the time goes; kv-triton forces the kernels), then
#      torch.compile of the chain if time is left (d3, optional), and where a kv decode step's time
#      goes (p: on the paths its CUDA graph takes); f only with a minute left (optional).
#   all (720 s): every step, for a lease with 12+ minutes of command time.
# A 15-minute lease (each start costs about a minute) fits both:
#   1. bash benchmarks/gpu_check.sh                                  (timeout_s 510)
#   2. GPU_CHECK_PART=2 bash benchmarks/gpu_check.sh                 (timeout_s 340, or what is left)
#   then give the machine back. benchmarks/targets.py joins the two calls' kernels.json and e2e.json
#   on this side (each call's g sees only its own); benchmarks/plot_results.py draws them.
# Rerun a step: GPU_CHECK_SKIP="c d2 f" leaves those steps out (a letter skips all its steps) and
# gives their reserved time to the rest; E2E_ARGS="--shapes opt-1.3b --variants dense kv kv-triton
# --align-ranks 1" is appended to e2e.py's arguments (there: the raw uniform ranks 717 / 1331 of
# run 2, to set beside aligned ones), PROFILE_ARGS to profile_step.py's. The brief's "dense with
# torch.compile" peer (untried: inductor's compile time at OPT-1.3B is unknown):
#   GPU_CHECK_PART=2 GPU_CHECK_SKIP="c d3 p" GPU_CHECK_SECONDS=400 E2E_ARGS="--shapes opt-1.3b --variants
#   dense dense-compile kv-compile-triton --decode-batch 1 16 --prefill 1x2048" bash benchmarks/gpu_check.sh
#
# Time: GPU_CHECK_SECONDS (default per part, above) for all steps together. Each step's cap is the
# smaller of its own maximum and what is left after the minimum reserved for the steps after it, so
# a slow early step shortens the later ones instead of overrunning. Outputs: gpu_check.log,
# kernels.md, kernels.json, latent_attention.md, e2e.md, e2e.json, profile.md, targets.md (8 files:
# the device tool returns at most 8; a part writes only its own).
# Exit status 0 when every step passed (optional ones may be skipped or cut short), 1 otherwise.

set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
LOG=$OUT/gpu_check.log
: >"$LOG"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter

START=$(date +%s)
# GPU_CHECK_PART: 1 (default) correctness and the kernel microbenchmarks, 2 the end-to-end table
# and the profile, all: every step (a lease with 12+ minutes of command time). Step names, not
# letters: part 2 keeps c3 and d3.
PART=${GPU_CHECK_PART:-1}
case "$PART" in
  1) PART_SKIP=" c3 e d3 p f "; DEFAULT_TOTAL=450 ;;
  2) PART_SKIP=" c1 c2 d d2 "; DEFAULT_TOTAL=300 ;;
  all) PART_SKIP=" "; DEFAULT_TOTAL=720 ;;
  *) echo "gpu_check: GPU_CHECK_PART must be 1, 2 or all, got '$PART'" >&2; exit 2 ;;
esac
TOTAL=${GPU_CHECK_SECONDS:-$DEFAULT_TOTAL}
STATUS=()
FAILED=0
LAST_RC=0
LINK_MADE=0
SKIP=" ${GPU_CHECK_SKIP:-} "  # step letters to leave out, e.g. GPU_CHECK_SKIP="b d" for a rerun
trap 'if [ "$LINK_MADE" = 1 ]; then rm -f "$ROOT/tmps/kernels"; fi' EXIT
export PY ROOT OUT

# The least time each step after c1 is left (s): a step's cap stops this much short of the budget
# for every later step not skipped, so a slow step shortens the later ones, and skipped steps
# leave their share to the others. Set from the H200 runs (run 1: c1 54 s with 85 tests, 174 now;
# c2 61 s before the latent decode check joined it; c3 44 s; d 75-82 s for 6 rows, 9 now; e 64-81 s)
# and cut to fit: the scripts rewrite their tables as they go, so a step stopped by its cap keeps
# its finished rows. d3 and f reserve nothing: they run on what is left, and are not failures when
# nothing is, or when it runs out (OPTIONAL).
declare -A MIN_S=([c2]=60 [c3]=40 [d]=80 [d2]=60 [e]=100 [d3]=0 [p]=40 [f]=0 [g]=10)
# The least cap worth starting a step with (s): importing torch and starting CUDA take ~10 s.
declare -A MIN_CAP=([c1]=30 [c2]=30 [c3]=30 [d]=30 [d2]=30 [e]=40 [d3]=45 [p]=30 [f]=60)
OPTIONAL=" d3 f "
ORDER=(c1 c2 c3 d d2 e d3 p f g)
skipped() { [[ "$PART_SKIP" == *" $1 "* || "$SKIP" == *" $1 "* || "$SKIP" == *" ${1:0:1} "* ]]; }
reserve_after() {  # seconds kept for the steps after $1
  local sum=0 seen=0 l
  for l in "${ORDER[@]}"; do
    if (( seen )) && ! skipped "$l"; then sum=$(( sum + ${MIN_S[$l]:-0} )); fi
    [[ "$l" == "$1" ]] && seen=1
  done
  echo "$sum"
}

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME MAX_S RESERVE_S COMMAND...: run COMMAND under timeout min(MAX_S, time left - RESERVE_S).
step() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local letter=${name%%.*}
  LAST_RC=0
  if [[ "$PART_SKIP" == *" $letter "* ]]; then
    STATUS+=("$name: not in part $PART")
    return 0
  fi
  if [[ "$SKIP" == *" ${letter:0:1} "* || "$SKIP" == *" $letter "* ]]; then
    log "== $name: skipped (GPU_CHECK_SKIP)"
    STATUS+=("$name: skipped (GPU_CHECK_SKIP)")
    return 0
  fi
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    export -f "$1"
    set -- bash -c "$1"
  fi
  local left=$(( START + TOTAL - $(date +%s) - reserve ))
  local cap=$(( max < left ? max : left ))
  local least=${MIN_CAP[$letter]:-10}
  local optional=0
  [[ "$OPTIONAL" == *" ${letter} "* ]] && optional=1
  if (( cap < least )); then
    log "== $name: SKIPPED (no time left: ${left}s after the reserve of ${reserve}s, ${least}s needed)"
    STATUS+=("$name: skipped (no time left)")
    (( optional )) || FAILED=1
    LAST_RC=1
    return 0
  fi
  log "== $name (cap ${cap}s)"
  local t0=$(date +%s)
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  LAST_RC=$rc
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    STATUS+=("$name: ok (${dt}s)")
  elif (( rc == 124 || rc == 137 )); then
    STATUS+=("$name: TIMED OUT after ${dt}s (cap ${cap}s)$( (( optional )) && echo ', optional')")
    (( optional )) || FAILED=1
  else
    STATUS+=("$name: FAILED rc=$rc (${dt}s)")
    FAILED=1
  fi
  log "== $name: ${STATUS[-1]#*: }"
  return 0
}

log "repo $ROOT, out $OUT, python $PY, budget ${TOTAL}s"

# ------------------------------------------------------------------------------------------ a
versions() {
  "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "numpy", "setuptools", "pytest", "xdist", "pytest_benchmark", "tensorly"):
    try:
        print(name, getattr(__import__(name), "__version__", "?"))
    except Exception as exc:
        print(name, "absent:", type(exc).__name__, exc)
EOF
  local rc=$?
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  return $rc
}
step "a. versions" 40 0 versions

# ------------------------------------------------------------------------------------------ b
import_check() { (cd /tmp && "$PY" -c "import tmps, tmps.kernels.fused_projection as f; print('tmps', tmps.__file__); print('tmps.kernels', f.__file__)"); }
export -f import_check  # setup_imports runs in a child bash
setup_imports() {
  if "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . && import_check; then
    echo "editable install: ok"
    return 0
  fi
  echo "editable install failed; falling back to a tmps/kernels -> ../kernels link and PYTHONPATH"
  return 1
}
FAILED_BEFORE_B=$FAILED
step "b. imports (pip install -e, offline)" 90 0 setup_imports
if (( LAST_RC != 0 )); then  # (b's own import check passed otherwise: no third torch import)
  if [ ! -e "$ROOT/tmps/kernels" ]; then
    ln -s ../kernels "$ROOT/tmps/kernels" && LINK_MADE=1
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  if timeout 60 bash -c import_check 2>&1 | tee -a "$LOG"; then
    STATUS+=("b'. import fallback (link + PYTHONPATH): ok")
    FAILED=$FAILED_BEFORE_B  # the run can go on as if b had passed
  else
    STATUS+=("b'. import fallback: FAILED: tmps.kernels does not import")
    FAILED=1
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------------------------------ c
PYTEST_ARGS=(-q -rfEs --durations=15 tests/kernels -p no:cacheprovider)  # durations: where c1's compiles go
# (one python start for both probes: each costs seconds of the budget)
read -r HAS_XDIST HAS_BENCHMARK < <(timeout 60 "$PY" -c "import importlib.util as u; print(*(int(u.find_spec(m) is not None) for m in ('xdist', 'pytest_benchmark')))" 2>/dev/null || echo "0 0")
if [ "${HAS_XDIST:-0}" = 1 ]; then PYTEST_ARGS+=(-n 8); fi
if [ "${HAS_BENCHMARK:-0}" != 1 ]; then PYTEST_ARGS+=(-o "addopts="); fi
export HAS_BENCHMARK  # bench_block runs in a child bash
step "c1. pytest tests/kernels on CUDA" 180 "$(reserve_after c1)" "$PY" -m pytest "${PYTEST_ARGS[@]}"

kernel_check() {
  # The latent decode kernel first: it has never run on a GPU, while the projection's model-size
  # cases passed in run 1 (61 s of the cap there). The cap (c1 may leave c2 as little as its 60 s
  # reserve) then cuts the re-check rather than the first one.
  local rc=0
  "$PY" benchmarks/latent_decode_check.py --device cuda || rc=1
  "$PY" benchmarks/projection_check.py --device cuda || rc=1
  return $rc
}
step "c2. fused kernels vs float64 reference (model sizes)" 100 "$(reserve_after c2)" kernel_check

# 90 s: run 1 took 44 s; kv mode's fp16 projection now autotunes the kernel too (no in factor)
step "c3. compressed models at full rank on CUDA" 90 "$(reserve_after c3)" \
  "$PY" benchmarks/full_rank_check.py --device cuda

# ------------------------------------------------------------------------------------------ d
step "d. kernel microbenchmark (subset)" 150 "$(reserve_after d)" \
  "$PY" benchmarks/kernel_microbench.py --out "$OUT/kernels.md" --hidden 4096 --tokens 1 16 4096 \
  --ratios ${GPU_CHECK_RATIOS:-0.25} --layouts out_factor weights_model kv_model --no-compile

step "d2. latent attention microbenchmark (kv decode)" 90 "$(reserve_after d2)" \
  "$PY" benchmarks/latent_attention_bench.py --out "$OUT/latent_attention.md" --shapes opt-1.3b llama-3-8b \
  --context 1024 --align-ranks 1 8

# ------------------------------------------------------------------------------------------ e
E2E_CAP=$(( START + TOTAL - $(date +%s) - $(reserve_after e) - 5 ))
# --budget-s counts from e2e's own start, imports included; the 15 s left after it cover the cell in
# progress when the budget ends (e2e also saves on the timeout's SIGTERM)
step "e. end-to-end benchmark" "$E2E_CAP" "$(reserve_after e)" \
  "$PY" benchmarks/e2e.py --out "$OUT/e2e.md" --factors "${E2E_FACTORS:-random}" --calib-timeout 40 --kv-graphs \
  --budget-s $(( E2E_CAP > 45 ? E2E_CAP - 15 : 30 )) ${E2E_ARGS:-}

# ------------------------------------------------------------------------------------------ d3
D3_CAP=$(( START + TOTAL - $(date +%s) - $(reserve_after d3) - 5 ))
D3_CAP=$(( D3_CAP < 120 ? D3_CAP : 120 ))  # optional: it must not eat p's share when e ends early
step "d3. torch.compile of the chain (merged into kernels.json)" "$D3_CAP" "$(reserve_after d3)" \
  "$PY" benchmarks/kernel_microbench.py --out "$OUT/kernels.md" --merge --providers torch_compile \
  --hidden 4096 --tokens 1 4096 --ratios ${GPU_CHECK_RATIOS:-0.25} --layouts weights_model

# ------------------------------------------------------------------------------------------ p
P_CAP=$(( START + TOTAL - $(date +%s) - $(reserve_after p) - 5 ))
step "p. where a decode step's time goes (torch.profiler)" "$P_CAP" "$(reserve_after p)" \
  "$PY" benchmarks/profile_step.py --out "$OUT/profile.md" --prefill 1x2048 ${PROFILE_ARGS:-}

# ------------------------------------------------------------------------------------------ f
bench_block() {
  if [ "${HAS_BENCHMARK:-0}" != 1 ]; then
    echo "pytest-benchmark is not installed here: attention-block benchmark skipped"
    return 0
  fi
  "$PY" -m pytest benchmarks/bench_attention.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-max-time=0.1 --benchmark-min-rounds=3 --benchmark-columns=median,rounds --benchmark-sort=name
}
F_CAP=$(( START + TOTAL - $(date +%s) - $(reserve_after f) - 5 ))
step "f. attention-block benchmark (pytest-benchmark)" "$F_CAP" "$(reserve_after f)" bench_block

# ------------------------------------------------------------------------------------------ g
targets_table() {  # a missed target is a result (exit 3), not a failed step; a crash (1) is
  "$PY" benchmarks/targets.py --kernels "$OUT/kernels.json" --e2e "$OUT/e2e.json" --out "$OUT/targets.md"
  local rc=$?
  [ $rc -eq 0 ] || [ $rc -eq 3 ]
}
step "g. issue #4 targets against the measurements" 10 0 targets_table

# ------------------------------------------------------------------------------------------ summary
{
  echo
  [ -f "$OUT/kernels.md" ] && echo "kernels.md: $(grep -c '^| [0-9]' "$OUT/kernels.md") rows"
  [ -f "$OUT/latent_attention.md" ] && cat "$OUT/latent_attention.md"
  [ -f "$OUT/e2e.md" ] && cat "$OUT/e2e.md"
  [ -f "$OUT/targets.md" ] && cat "$OUT/targets.md"
  echo
  echo "gpu_check summary ($(( $(date +%s) - START ))s of ${TOTAL}s), logs in $LOG:"
  for s in "${STATUS[@]}"; do echo "  $s"; done
} | tee -a "$LOG"
exit $FAILED
