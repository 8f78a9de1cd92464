#!/usr/bin/env bash
# benches/gpu_check.sh OUTDIR -- the one script to run on a GPU machine (H100/H200, no network).
#
# Steps, each logged to OUTDIR/<step>.log with its status in OUTDIR/summary.txt; a failing step does not
# stop the later ones, and every step has a timeout so the whole script ends within GPU_CHECK_BUDGET_S
# (default 530 s, i.e. under 9 minutes):
#   env       nvidia-smi, python / torch / triton / nvcc / compute-sanitizer versions
#   wheels    installs Liger-Kernel and Cut Cross-Entropy from the wheels carried in .whl/ (pure Python,
#             --no-deps, into $GPU_CHECK_SITE, default /tmp/lpc_site, put on PYTHONPATH) when not importable
#   build     python3 setup.py build_ext --inplace with the machine's torch (CUDA extension), then
#             python3 -m lpc_kernels.info
#   test      pytest -m "cuda or triton" -x tests  (TRITON_INTERPRET=0: Triton runs natively)
#   sanitize  compute-sanitizer --tool memcheck python3 scripts/cuda_smoke.py (if both exist)
#   bench     the GPU benchmark set: one pytest run over benches/ -> OUTDIR/bench.json, the issue's target
#             shapes of every op first; benchmarks that would start after the step's deadline are skipped
#             and listed as such (LPC_BENCH_DEADLINE), and SIGINT at the end still gets the JSON written
#   report    benches/report.py -> OUTDIR/report.md, summary.csv, *_scaling.png (if matplotlib exists)
#
# Environment:
#   PYTHON=python3              interpreter with the machine's CUDA torch
#   GPU_CHECK_BUDGET_S=530      wall-clock budget of the whole script
#   GPU_CHECK_STEPS=...         comma list of steps to run (default: all, in the order above)
#   GPU_CHECK_BENCH_FILES=...   bench files / pytest node ids to run (default: benches)
#   GPU_CHECK_BENCH_ARGS=...    extra pytest args for every bench run (e.g. "--quick" or "-k 'not compile'")
#   GPU_CHECK_PYTEST_ARGS=...   extra args for the test step
#   GPU_CHECK_DRY_RUN=1         test this script's logic without a GPU: build for CPU, collect (not run)
#                               the GPU tests, print the sanitizer command, run a tiny CPU bench subset.
#                               Without a visible GPU and without DRY_RUN, the GPU steps are skipped.
set -u -o pipefail

OUTDIR=${1:?usage: benches/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-530}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STEPS=${GPU_CHECK_STEPS:-env,wheels,build,test,sanitize,bench,report}
DRY=${GPU_CHECK_DRY_RUN:-0}
SUMMARY=$OUTDIR/summary.txt
SITE=${GPU_CHECK_SITE:-/tmp/lpc_site}

export TRITON_INTERPRET=0            # tests/conftest.py only setdefaults it to 1: Triton runs natively here
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.cache/triton}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# minimum seconds kept for each later step, so an overrunning early step cannot starve the benchmarks
declare -A RESERVE=([env]=5 [wheels]=5 [build]=60 [test]=60 [sanitize]=45 [bench]=180 [report]=20)
declare -A CAP=([env]=30 [wheels]=60 [build]=240 [test]=150 [sanitize]=120 [bench]=100000 [report]=60)
ORDER=(env wheels build test sanitize bench report)

: > "$SUMMARY"
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
record() { printf '%-9s %-8s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }

# seconds step $1 may use: its cap, minus what the later wanted steps must keep
budget_for() {
  local step=$1 later=0 seen=0 s
  for s in "${ORDER[@]}"; do
    if [ $seen = 1 ] && want "$s"; then later=$((later + RESERVE[$s])); fi
    [ "$s" = "$step" ] && seen=1
  done
  local left=$((DEADLINE - $(date +%s) - later))
  local cap=${CAP[$step]}
  echo $(( left < cap ? left : cap ))
}

# run_step NAME FUNCTION [ARGS...]: run the (exported) shell function in a child bash under the step's
# timeout, log to OUTDIR/NAME.log, record the status
run_step() {
  local name=$1; shift
  local t; t=$(budget_for "$name")
  if [ "$t" -lt 10 ]; then record "$name" SKIPPED "time budget exhausted"; return 0; fi
  log "$name (timeout ${t}s): $*"
  local s0; s0=$(date +%s)
  timeout -s INT -k 20 "$t" bash -c '"$@"' _ "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s0 ))
  if [ $rc -eq 0 ]; then record "$name" OK "${dt}s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" TIMEOUT "after ${dt}s (limit ${t}s), rc=$rc; see $name.log"
  else record "$name" FAILED "rc=$rc after ${dt}s; see $name.log"; fi
  tail -n 5 "$OUTDIR/$name.log" | sed "s/^/    $name| /"
  return 0
}

# ------------------------------------------------------------------------------------------ GPU?
GPU_REASON=$("$PY" -c "
import torch
if not torch.cuda.is_available():
    print('torch.cuda.is_available() is False (torch ' + torch.__version__ + ', CUDA ' + str(torch.version.cuda) + ')')
" 2>&1)
if [ -z "$GPU_REASON" ]; then HAVE_GPU=1; else HAVE_GPU=0; fi
if [ $HAVE_GPU = 1 ]; then log "GPU visible"; else log "no GPU: $GPU_REASON"; fi
SMOKE=scripts/cuda_smoke.py
export OUTDIR PY HAVE_GPU DRY SMOKE ROOT GPU_REASON BUDGET STEPS
if [ $HAVE_GPU = 0 ] && [ "$DRY" != 1 ]; then
  log "no GPU and GPU_CHECK_DRY_RUN != 1: the GPU steps (test, sanitize, bench) will be skipped"
fi
[ "$DRY" = 1 ] && log "DRY RUN: exercising the script's logic on $( [ $HAVE_GPU = 1 ] && echo GPU || echo CPU )"

# -------------------------------------------------------------------------------------------- env
step_env() {
  echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "budget: ${BUDGET}s  steps: $STEPS  dry: $DRY"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not found"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
for m in ("transformers", "pytest_benchmark", "matplotlib", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e: print(m, "not importable:", type(e).__name__, e)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
  echo "git: $(git rev-parse --verify -q HEAD 2>/dev/null || echo 'no git metadata in this tree')"
}
export -f step_env
if want env; then run_step env step_env; fi

# ----------------------------------------------------------------------------------------- wheels
# Runs in this shell (not a child) so the PYTHONPATH it sets reaches the later steps.
if want wheels; then
  s0=$(date +%s)
  {
    missing=()
    for pair in liger_kernel:liger_kernel cut_cross_entropy:cut_cross_entropy; do
      mod=${pair%%:*}; whl=${pair##*:}
      if "$PY" -c "import $mod" 2>/dev/null; then echo "$mod: already importable"
      else
        f=$(ls "$ROOT"/.whl/${whl}-*.whl 2>/dev/null | head -n 1)
        if [ -n "$f" ]; then missing+=("$f"); else echo "$mod: missing and no wheel in .whl/ (carry .whl)"; fi
      fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
      mkdir -p "$SITE"
      echo "installing ${missing[*]} into $SITE"
      if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}"; then
        echo "pip failed: unpacking the (pure-Python) wheels into $SITE instead"
        for f in "${missing[@]}"; do "$PY" -m zipfile -e "$f" "$SITE"; done
      fi
    fi
  } > "$OUTDIR/wheels.log" 2>&1
  if [ -d "$SITE" ]; then export PYTHONPATH="$SITE:$PYTHONPATH"; fi
  bad=""
  for mod in liger_kernel cut_cross_entropy; do
    "$PY" -c "import $mod" >> "$OUTDIR/wheels.log" 2>&1 || bad="$bad $mod"
  done
  if [ -z "$bad" ]; then record wheels OK "$(( $(date +%s) - s0 ))s"
  else record wheels FAILED "not importable:$bad (their benchmarks will be skipped with the reason); see wheels.log"; fi
fi

# ------------------------------------------------------------------------------------------ build
step_build() {
  "$PY" setup.py build_ext --inplace || return $?
  "$PY" -m lpc_kernels.info
}
export -f step_build
if want build; then run_step build step_build; fi

# ------------------------------------------------------------------------------------------- test
step_test() {
  # shellcheck disable=SC2086
  if [ $HAVE_GPU = 1 ]; then
    # no autotune sweeps for the many small test shapes (LPC_TRITON_AUTOTUNE=0); the benchmarks tune.
    # One process per test file, so a crash (a segfault was seen in test_cuda.py) cannot hide the rest.
    local rc=0 f
    for f in tests/test_cuda.py tests/test_triton.py tests/test_philox.py; do
      echo "== $f"
      LPC_TRITON_AUTOTUNE=${LPC_TRITON_AUTOTUNE_TESTS:-0} \
      "$PY" -m pytest -m "cuda or triton" ${GPU_CHECK_FAILFAST:--x} -q -rfs --tb=short -p no:cacheprovider \
        --junitxml="$OUTDIR/tests_$(basename "$f" .py).xml" ${GPU_CHECK_PYTEST_ARGS:-} "$f" || rc=1
    done
    return $rc
  else
    echo "dry run without a GPU: collecting (not running) the GPU test selection"
    "$PY" -m pytest -m "cuda or triton" -q -p no:cacheprovider --collect-only ${GPU_CHECK_PYTEST_ARGS:-} tests
  fi
}
export -f step_test
if want test; then
  if [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step test step_test
  else record test SKIPPED "no GPU: $GPU_REASON"; fi
fi

# --------------------------------------------------------------------------------------- sanitize
step_sanitize() {
  echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 $PY $SMOKE"
  if [ $HAVE_GPU = 1 ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" "$SMOKE"
  else
    echo "dry run without a GPU: command printed, not run"
  fi
}
export -f step_sanitize
if want sanitize; then
  if [ ! -f "$SMOKE" ]; then record sanitize SKIPPED "$SMOKE does not exist"
  elif [ $HAVE_GPU = 1 ] && ! command -v compute-sanitizer >/dev/null; then record sanitize SKIPPED "compute-sanitizer not on PATH"
  elif [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step sanitize step_sanitize
  else record sanitize SKIPPED "no GPU: $GPU_REASON"; fi
fi

# ------------------------------------------------------------------------------------------ bench
# One pytest run over the bench files: benches/conftest.py orders the issue's target shapes of every op
# first (linear, token, train step, gumbel, preference), then the scaling shapes. Benchmarks that would
# start after LPC_BENCH_DEADLINE are skipped (and listed in the JSON); at the end of the budget SIGINT
# makes pytest finish the running benchmark and still write the JSON; KILL 30 s later.
step_bench() {
  local budget=$1 files=${GPU_CHECK_BENCH_FILES:-benches} extra=${GPU_CHECK_BENCH_ARGS:-} device_env=""
  if [ $HAVE_GPU = 0 ]; then  # dry run on CPU: a few cheap benchmarks, enough to exercise JSON + report
    files=${GPU_CHECK_BENCH_FILES:-"benches/bench_gumbel_softmax.py benches/bench_preference_loss.py"}
    extra=${GPU_CHECK_BENCH_ARGS:-"--quick --bench-no-memory -k 'eager or ours_cpu or ours_reference'"}
    device_env="LPC_BENCH_DEVICE=cpu"
  fi
  local now; now=$(date +%s)
  local soft=$((budget - 45)) stop=$((budget - 30))
  if [ $soft -lt 10 ]; then soft=$((budget / 2)); stop=$((budget * 3 / 4)); fi
  echo "bench: $files; new benchmarks until +${soft}s, SIGINT at +${stop}s, KILL at +$((stop + 30))s"
  # shellcheck disable=SC2086
  env $device_env LPC_BENCH_DEADLINE=$((now + soft)) timeout --foreground -s INT -k 30 "$stop" \
    bash -c "exec \"$PY\" -m pytest $files --benchmark-only -rs -q -p no:cacheprovider \
      --benchmark-json=\"$OUTDIR/bench.json\" --benchmark-columns=median,min,max,rounds $extra"
  local rc=$?
  echo "bench: pytest rc=$rc"
  if [ ! -s "$OUTDIR/bench.json" ]; then echo "bench: NO JSON written"; return 1; fi
  if [ $rc -eq 124 ]; then echo "bench: stopped by SIGINT at the budget's end; the JSON holds what ran"; return 0; fi
  return $rc
}
export -f step_bench
if want bench; then
  if [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then
    t=$(budget_for bench)
    run_step bench step_bench "$((t - 10))"
  else record bench SKIPPED "no GPU: $GPU_REASON"; fi
fi

# ----------------------------------------------------------------------------------------- report
step_report() {
  local jsons=("$OUTDIR"/bench*.json)
  [ -e "${jsons[0]}" ] || { echo "no bench*.json in $OUTDIR"; return 1; }
  "$PY" benches/report.py "${jsons[@]}" --out "$OUTDIR/report.md"
}
export -f step_report
if want report; then run_step report step_report; fi

record total "-" "$(( $(date +%s) - START ))s of ${BUDGET}s budget; outputs in $OUTDIR"
echo "---- $SUMMARY"; cat "$SUMMARY"
if grep -qE '^(build|test|sanitize|bench|report|wheels) +(FAILED|TIMEOUT)' "$SUMMARY"; then exit 1; fi
exit 0
