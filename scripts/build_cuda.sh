#!/usr/bin/env bash
# Compile and link the CUDA extension (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cpp + *.cu) against the CUDA 13
# torch wheel, on a machine without a GPU, then load it and check that every lpc op has a CUDA kernel.
#
# - venv: ~/.cache/lpc-kernels/venv-cuda (override: LPC_CUDA_VENV), created once with torch==2.14.1 (the CUDA 13 wheel, ~5 GB)
#   plus numpy setuptools wheel ninja, reused while its .installed stamp exists;
# - CUDA_HOME: the CUDA 13 toolkit that the `nvcc` on PATH runs (it may be a wrapper script that execs
#   the real one; torch's own guess would take the wrapper's prefix and fail to link -lcudart);
# - output: build/cuda/lpc_kernels/_C*.so (objects in build/cuda-tmp, reused by ninja on the next run),
#   so the CPU build's lpc_kernels/_C*.so in the source tree stays the CPU one;
# - TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200), MAX_JOBS to 2.
# Exits non-zero, loudly, if anything fails or an op lacks a CUDA kernel. Prints the times.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)

# outside the work tree by default, so fresh clones (CI) reuse it
VENV=${LPC_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lpc-kernels/venv-cuda}
TORCH_SPEC=${LPC_CUDA_TORCH:-torch==2.14.1}
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
PY="$VENV/bin/python"

fail() { echo "build_cuda: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------ venv
if [ ! -f "$VENV/.installed" ]; then
  echo "build_cuda: creating $VENV with $TORCH_SPEC (CUDA wheel) ..."
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy setuptools wheel ninja || fail "pip install into $VENV"
  touch "$VENV/.installed"
else
  echo "build_cuda: reusing $VENV"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
  || fail "torch in $VENV is not a CUDA build (remove $VENV to recreate it)"
t_venv=$(date +%s)

# ------------------------------------------------------------------------------------- CUDA_HOME
toolkit_of_nvcc() {
  # Prints the toolkit directory of the nvcc that runs for `nvcc` on PATH (following wrapper scripts).
  local nv real
  nv=$(command -v nvcc) || return 1
  real=$(readlink -f "$nv")
  if head -c 2 "$real" | grep -q '^#!'; then  # a script: find the nvcc it execs
    real=$(grep -oE '/[^" ]*/bin/nvcc' "$real" | head -n 1)
    [ -n "$real" ] || return 1
    real=$(readlink -f "$real")
  fi
  dirname "$(dirname "$real")"
}
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "${CUDA_HOME}/bin/nvcc" ]; then
  CUDA_HOME=$(toolkit_of_nvcc) || fail "no nvcc on PATH and CUDA_HOME unset"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
nvcc_release=$("$CUDA_HOME/bin/nvcc" --version | grep -oE 'release [0-9]+\.[0-9]+' | head -n 1)
torch_cuda=$("$PY" -c "import torch; print(torch.version.cuda)")
echo "build_cuda: CUDA_HOME=$CUDA_HOME ($nvcc_release), torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda)"
nvcc_major=${nvcc_release#release }
[ "${nvcc_major%%.*}" = "${torch_cuda%%.*}" ] || fail "nvcc ($nvcc_release) and torch (CUDA $torch_cuda) differ in major version"

# ----------------------------------------------------------------------------------------- build
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export PATH="$CUDA_HOME/bin:$PATH"
echo "build_cuda: compiling (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) ..."
"$PY" setup.py -q build_ext --build-lib build/cuda --build-temp build/cuda-tmp || fail "compile/link"
t_build=$(date +%s)

so=$(ls build/cuda/lpc_kernels/_C*.so 2>/dev/null | head -n 1)
[ -n "$so" ] || fail "no build/cuda/lpc_kernels/_C*.so after the build"

# ------------------------------------------------------------------------- load and check kernels
"$PY" - "$so" <<'EOF' || fail "the built extension does not register every op for CUDA"
import importlib.util
import sys

import torch

so = sys.argv[1]
spec = importlib.util.spec_from_file_location("lpc_kernels._C", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # runs the TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations
ops = ["token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_", "linear_token_logprobs_fwd",
       "linear_token_logprobs_bwd", "gumbel_softmax_fwd", "gumbel_softmax_bwd", "preference_loss_fwd",
       "preference_loss_bwd"]
if hasattr(torch._C, "_dispatch_get_all_op_names"):  # any op added to the schema later is checked too
    ops += sorted({n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("lpc::")} - set(ops))
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lpc::{op}", "CUDA")]
no_cpu = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lpc::{op}", "CPU")]
print(f"build_cuda: {so}: {len(ops) - len(missing)}/{len(ops)} lpc ops have a CUDA kernel"
      + (f"; without a CPU kernel: {', '.join(no_cpu)}" if no_cpu else "; all have a CPU kernel"))
if missing:
    print(f"build_cuda: missing CUDA kernels: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
EOF
t_end=$(date +%s)
echo "build_cuda: OK in $((t_end - t0)) s (venv $((t_venv - t0)) s, compile+link $((t_build - t_venv)) s," \
     "check $((t_end - t_build)) s)"
