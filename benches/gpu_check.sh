#!/usr/bin/env bash
# benches/gpu_check.sh OUTDIR -- the one script to run on a GPU machine (H100/H200, no network).
#
# Steps, each logged to OUTDIR/<step>.log with one line in OUTDIR/summary.txt (status, seconds, note); a
# failing step does not stop the later ones, and every step has a timeout so the whole script ends
# within GPU_CHECK_BUDGET_S (default 400 s). summary.txt is printed last: it is what survives when only
# the tail of the output comes back.
#   env       nvidia-smi, versions -> OUTDIR/env.json (GPU, driver, CUDA runtime, torch, triton, python,
#             nvcc, git commit: $LPC_GIT_COMMIT when set, else `git rev-parse HEAD`)
#   wheels    installs Liger-Kernel and Cut Cross-Entropy from the wheels carried in .whl/ (pure Python,
#             --no-deps, into $GPU_CHECK_SITE, default /tmp/lpc_site, put on PYTHONPATH) when not importable
#   build     python3 setup.py build_ext --inplace with the machine's torch (CUDA extension), then
#             python3 -m lpc_kernels.info
#   probe     scripts/cuda_bad_input_probe.py: every bad-input case of tests/backends/test_cuda_kernels.py in its own
#             process (a segfault there once killed the whole test run); crashes rerun under cuda-gdb,
#             backtraces in OUTDIR/probe/gdb_*.txt, table in OUTDIR/probe/probe.txt
#   test      pytest -m "cuda or triton" per test file of tests/ops and tests/backends (TRITON_INTERPRET=0:
#             Triton runs natively)
#   sanitize  compute-sanitizer --tool memcheck python3 scripts/cuda_smoke.py (if both exist)
#   bench     the GPU benchmark set: one pytest run over benches/ -> OUTDIR/bench.json, the issue's target
#             shapes of every op first; benchmarks that would start after the step's deadline are skipped
#             and listed as such (LPC_BENCH_DEADLINE), and SIGINT at the end still gets the JSON written.
#             LPC_TRITON_AUTOTUNE_LOG=OUTDIR/autotune.json: the Triton kernels' chosen configs (at exit)
#   dist      short DDP and FSDP2 runs of the trainer (torchrun --standalone --nproc-per-node 1, NCCL)
#   report    benches/report.py -> OUTDIR/report.md, summary.csv, *_scaling.png (if matplotlib exists)
#
# Time: each step gets min(its cap, what is left minus the minimum kept for the later wanted steps);
# the bench step takes whatever the others leave.
# Narrow the bench with GPU_CHECK_BENCH_ARGS / GPU_CHECK_BENCH_FILES, or drop steps with GPU_CHECK_STEPS.
#
# Environment:
#   PYTHON=python3              interpreter with the machine's CUDA torch
#   GPU_CHECK_BUDGET_S=400      wall-clock budget of the whole script
#   GPU_CHECK_STEPS=...         comma list of steps to run (default: all, in the order above)
#   GPU_CHECK_BENCH_FILES=...   bench files / pytest node ids to run (default: benches)
#   GPU_CHECK_BENCH_ARGS=...    extra pytest args for every bench run (e.g. "--quick" or "-k 'not compile'")
#   GPU_CHECK_PYTEST_ARGS=...   extra args for the test step, shell-quoted (e.g. "-k 'preference_loss or opcheck'")
#   LPC_GIT_COMMIT=...          the commit of the tree, for env.json (a copied tree's .git can be stale)
#   GPU_CHECK_DRY_RUN=1         test this script's logic without a GPU: build for CPU, probe the controls
#                               (--dry-run), collect (not run) the GPU tests, print the sanitizer and dist
#                               commands, run a tiny CPU bench subset.
#                               Without a visible GPU and without DRY_RUN, the GPU steps are skipped.
set -u -o pipefail

OUTDIR=${1:?usage: benches/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STEPS=${GPU_CHECK_STEPS:-env,wheels,build,probe,test,sanitize,bench,dist,report}
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

# Minimum seconds kept for each later wanted step, so an overrunning early step cannot starve the rest,
# and the most each step may take. GRACE: the seconds `timeout -k` waits after SIGINT before KILL; budget_for
# subtracts it, so a step that ignores SIGINT still ends inside the budget.
# Worst case, all non-bench steps at their caps: 30+45+180+45+150+90+60+30 = 630 s > 400, so the reserves
# (5+5+45+20+60+40+60+40+10 = 285 s) decide: an early
# step that overruns eats into the bench step first.
declare -A RESERVE=([env]=5 [wheels]=5 [build]=45 [probe]=20 [test]=60 [sanitize]=40 [bench]=60 [dist]=40 [report]=10)
declare -A CAP=([env]=30 [wheels]=45 [build]=180 [probe]=45 [test]=150 [sanitize]=90 [bench]=100000 [dist]=60 [report]=30)
ORDER=(env wheels build probe test sanitize bench dist report)
GRACE=10

: > "$SUMMARY"
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# record NAME STATUS SECONDS NOTE: one line per step in summary.txt (and on stdout)
record() { printf '%-9s %-8s %5s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }

# seconds step $1 may use: its cap, minus what the later wanted steps must keep, minus GRACE
budget_for() {
  local step=$1 later=0 seen=0 s
  for s in "${ORDER[@]}"; do
    if [ $seen = 1 ] && want "$s"; then later=$((later + RESERVE[$s])); fi
    [ "$s" = "$step" ] && seen=1
  done
  local left=$((DEADLINE - $(date +%s) - later - GRACE))
  local cap=${CAP[$step]}
  echo $(( left < cap ? left : cap ))
}

# A short note for a step's summary line, read from its outputs.
step_note() {
  case $1 in
    probe) tail -n 1 "$OUTDIR/probe/probe.txt" 2>/dev/null | sed 's/^probe summary: //' ;;
    test)  grep -hE '^(== |[0-9]+ (passed|failed|skipped|errors?|deselected)|=+ [0-9]+ .* in [0-9.]+s|[0-9/]+ tests? collected)' \
             "$OUTDIR/test.log" 2>/dev/null | sed -E 's/^=+ //; s/ =+$//' | paste -sd ' ' | cut -c1-300 ;;
    dist)  grep -hE '^dist: ' "$OUTDIR/dist.log" 2>/dev/null | sed 's/^dist: //' | paste -sd ';' ;;
    *) ;;
  esac
}

# run_step NAME FUNCTION [ARGS...]: run the (exported) shell function in a child bash under the step's
# timeout, log to OUTDIR/NAME.log, record the status. STEP_T is the step's time limit (for the function).
run_step() {
  local name=$1; shift
  local t; t=$(budget_for "$name")
  if [ "$t" -lt 10 ]; then record "$name" SKIPPED 0s "time budget exhausted"; return 0; fi
  log "$name (timeout ${t}s): $*"
  local s0; s0=$(date +%s)
  STEP_T=$t timeout -s INT -k $GRACE "$t" bash -c '"$@"' _ "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s0 ))
  local note; note=$(step_note "$name")
  if [ $rc -eq 0 ]; then record "$name" OK "${dt}s" "$note"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" TIMEOUT "${dt}s" "limit ${t}s, rc=$rc; see $name.log $note"
  else record "$name" FAILED "${dt}s" "rc=$rc; see $name.log $note"; fi
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
export OUTDIR PY HAVE_GPU DRY SMOKE ROOT GPU_REASON BUDGET STEPS GRACE
if [ $HAVE_GPU = 0 ] && [ "$DRY" != 1 ]; then
  log "no GPU and GPU_CHECK_DRY_RUN != 1: the GPU steps (probe, test, sanitize, bench, dist) will be skipped"
fi
[ "$DRY" = 1 ] && log "DRY RUN: exercising the script's logic on $( [ $HAVE_GPU = 1 ] && echo GPU || echo CPU )"

# -------------------------------------------------------------------------------------------- env
step_env() {
  echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "budget: ${BUDGET}s  steps: $STEPS  dry: $DRY"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not found"
  # env.json: what the results were measured on (benches/results/ records it beside the numbers)
  local commit src
  # LPC_GIT_COMMIT first: the device machine's copy of the tree can carry a stale .git (seen: HEAD two
  # commits behind the files it held)
  commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)
  if [ -n "${LPC_GIT_COMMIT:-}" ]; then commit=$LPC_GIT_COMMIT; src="LPC_GIT_COMMIT"
  elif [[ "$commit" =~ ^[0-9a-f]{40}$ ]]; then src="git rev-parse HEAD (may be stale on a copied tree)"
  else commit="unknown"; src="no .git in this tree and LPC_GIT_COMMIT unset"; fi
  echo "git: $commit ($src)"
  GIT_COMMIT=$commit GIT_COMMIT_SOURCE=$src "$PY" scripts/gpu_env.py "$OUTDIR/env.json"
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
      if ! timeout "$(budget_for wheels)" "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}"; then
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
  if [ -z "$bad" ]; then record wheels OK "$(( $(date +%s) - s0 ))s" ""
  else record wheels FAILED "$(( $(date +%s) - s0 ))s" "not importable:$bad (their benchmarks are skipped with the reason); see wheels.log"; fi
fi

# ------------------------------------------------------------------------------------------ build
step_build() {
  "$PY" setup.py build_ext --inplace || return $?
  "$PY" -m lpc_kernels.info
}
export -f step_build
if want build; then run_step build step_build; fi

# ------------------------------------------------------------------------------------------ probe
# Every bad-input case of tests/backends/test_cuda_kernels.py in its own process: which raise, which crash (and where,
# from cuda-gdb). Early, so a crash that would kill the test step is already characterised.
step_probe() {
  local dry="" budget=$((STEP_T - 5))
  [ $HAVE_GPU = 1 ] || dry="--dry-run"
  "$PY" scripts/cuda_bad_input_probe.py --out "$OUTDIR/probe" --budget "$budget" --gdb-timeout 30 $dry
}
export -f step_probe
if want probe; then
  if [ ! -f scripts/cuda_bad_input_probe.py ]; then record probe SKIPPED 0s "scripts/cuda_bad_input_probe.py does not exist"
  elif [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step probe step_probe
  else record probe SKIPPED 0s "no GPU: $GPU_REASON"; fi
fi

# ------------------------------------------------------------------------------------------- test
step_test() {
  # shell-parse GPU_CHECK_PYTEST_ARGS like the bench args, so "-k 'a or b'" stays one -k expression
  local -a pytest_args
  eval "pytest_args=(${GPU_CHECK_PYTEST_ARGS:-})"
  if [ $HAVE_GPU = 1 ]; then
    # no autotune sweeps for the many small test shapes (LPC_TRITON_AUTOTUNE=0); the benchmarks tune.
    # One process per test file, so a crash (a segfault was seen in the CUDA kernel tests) cannot hide the rest.
    local rc=0 f
    for f in tests/backends/test_*.py tests/ops/test_*.py; do
      echo "== $f"
      LPC_TRITON_AUTOTUNE=${LPC_TRITON_AUTOTUNE_TESTS:-0} \
      "$PY" -m pytest -m "cuda or triton" ${GPU_CHECK_FAILFAST:--x} -q -rfs --tb=short -p no:cacheprovider \
        --junitxml="$OUTDIR/tests_$(basename "$f" .py).xml" "${pytest_args[@]}" "$f" || rc=1
    done
    return $rc
  else
    echo "dry run without a GPU: collecting (not running) the GPU test selection"
    "$PY" -m pytest -m "cuda or triton" -q -p no:cacheprovider --collect-only "${pytest_args[@]}" tests
  fi
}
export -f step_test
if want test; then
  if [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step test step_test
  else record test SKIPPED 0s "no GPU: $GPU_REASON"; fi
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
  if [ ! -f "$SMOKE" ]; then record sanitize SKIPPED 0s "$SMOKE does not exist"
  elif [ $HAVE_GPU = 1 ] && ! command -v compute-sanitizer >/dev/null; then record sanitize SKIPPED 0s "compute-sanitizer not on PATH"
  elif [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step sanitize step_sanitize
  else record sanitize SKIPPED 0s "no GPU: $GPU_REASON"; fi
fi

# ------------------------------------------------------------------------------------------ bench
# One pytest run over the bench files: benches/conftest.py orders the issue's target shapes of every op
# first (linear, token, train step, gumbel, preference), then the scaling shapes. Benchmarks that would
# start after LPC_BENCH_DEADLINE are skipped (and listed in the JSON); at the end of the budget SIGINT
# makes pytest finish the running benchmark and still write the JSON; KILL 30 s later.
# LPC_TRITON_AUTOTUNE_LOG: the Triton kernels write the configs their autotuners chose there at exit.
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
  env $device_env LPC_TRITON_AUTOTUNE_LOG="$OUTDIR/autotune.json" LPC_BENCH_DEADLINE=$((now + soft)) timeout --foreground -s INT -k 30 "$stop" \
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
  else record bench SKIPPED 0s "no GPU: $GPU_REASON"; fi
  if [ -s "$OUTDIR/autotune.json" ]; then
    record autotune FILE - "autotune.json ($(wc -c < "$OUTDIR/autotune.json") bytes): the Triton configs chosen in bench"
  else
    record autotune NONE - "no autotune.json (no Triton kernel tuned in bench, or LPC_TRITON_AUTOTUNE_LOG unsupported)"
  fi
fi

# ------------------------------------------------------------------------------------------- dist
# Short DDP / FSDP2 runs of the trainer through torchrun (one process, NCCL on the one GPU): checks that
# the distributed code paths start, step and stop cleanly. Tiny settings; each run gets half the step.
DIST_ARGS="--steps 5 --batch-size 8 --eval-size 16 --num-train 64"
export DIST_ARGS
step_dist() {
  local per rc=0 strat r tr cmd end=$(( $(date +%s) + STEP_T - 3 ))
  tr=$(command -v torchrun || echo "$PY -m torch.distributed.run")
  for strat in ddp fsdp2; do
    # ddp gets 3/5 of what is left (it also trains and caches the tokenizer), fsdp2 the rest
    if [ $strat = ddp ]; then per=$(( (end - $(date +%s)) * 3 / 5 )); else per=$(( end - $(date +%s) )); fi
    if [ $per -lt 5 ]; then echo "dist: $strat SKIPPED: no time left in the step"; rc=1; continue; fi
    cmd="$tr --standalone --nproc-per-node 1 -m lpc.train --strategy $strat $DIST_ARGS --device cuda"
    cmd="$cmd --output-dir /tmp/lpc_dist_runs/$strat --cache-dir $ROOT/.cache/lpc"
    echo "== $strat: $cmd  (timeout ${per}s)"
    if [ $HAVE_GPU = 0 ]; then echo "dist: $strat dry run without a GPU: command printed, not run"; continue; fi
    # shellcheck disable=SC2086
    timeout -s INT -k 5 "$per" $cmd > "$OUTDIR/dist_$strat.log" 2>&1
    r=$?
    tail -n 15 "$OUTDIR/dist_$strat.log"
    if [ $r -eq 0 ]; then echo "dist: $strat OK"
    else echo "dist: $strat FAILED rc=$r (log: dist_$strat.log)"; rc=1; fi
  done
  return $rc
}
export -f step_dist
if want dist; then
  if [ $HAVE_GPU = 1 ] || [ "$DRY" = 1 ]; then run_step dist step_dist
  else record dist SKIPPED 0s "no GPU: $GPU_REASON"; fi
fi

# ----------------------------------------------------------------------------------------- report
step_report() {
  local jsons=("$OUTDIR"/bench*.json)
  [ -e "${jsons[0]}" ] || { echo "no bench*.json in $OUTDIR"; return 1; }
  "$PY" benches/report.py "${jsons[@]}" --out "$OUTDIR/report.md"
}
export -f step_report
if want report; then run_step report step_report; fi

record total - "$(( $(date +%s) - START ))s" "of ${BUDGET}s budget; outputs in $OUTDIR"
# Last in the output on purpose: the caller may see only the final lines.
echo "---- $SUMMARY (step, status, seconds, note)"; cat "$SUMMARY"
if grep -qE '^(build|probe|test|sanitize|bench|dist|report|wheels) +(FAILED|TIMEOUT)' "$SUMMARY"; then exit 1; fi
exit 0
