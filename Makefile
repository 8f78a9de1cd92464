# `make train` and `make test` work on a fresh machine: they create (or reuse) .venv and install what
# is needed. On a machine whose python3 already has a CUDA torch, .venv reuses it (system site packages);
# elsewhere it gets the CPU wheel torch==2.13.0 with triton==3.8.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0 triton==3.8.0
DEPS := numpy transformers safetensors tqdm tokenizers ninja pytest pytest-benchmark hypothesis \
	pyyaml matplotlib pyarrow peft scikit-learn tensorboard "trl>=1.16,<1.17"
PYTEST_ARGS ?=

.PHONY: venv build test train build-cuda bench clean info

$(VENV)/.installed: pyproject.toml Makefile
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "using the CUDA torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && $(PY) -m pip install -q $(DEPS); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q $(CPU_TORCH) $(DEPS); \
	fi
	touch $@

venv: $(VENV)/.installed

# The C++ extension (CPU kernels; CUDA kernels too when torch is a CUDA build).
build: venv
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

train: build
	$(PY) -m lpc.train $(ARGS)

info: build
	$(PY) -m lpc_kernels.info

# Compile and link csrc/cuda against the CUDA 13 torch wheel in a separate cached venv (no GPU needed).
build-cuda:
	bash scripts/build_cuda.sh

# Benchmarks (benches/, pytest-benchmark) -> $(BENCH_OUT)/bench.json + report.md, summary.csv, *.png.
# Peers: Liger-Kernel and Cut Cross-Entropy (--no-deps: they must not replace torch), matplotlib for plots.
# BENCH_ARGS=--quick runs the target shapes only. On a GPU machine use benches/gpu_check.sh instead.
BENCH_DEVICE = $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
BENCH_OUT ?= benches/results/$(BENCH_DEVICE)
BENCH_ARGS ?=

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps liger-kernel cut-cross-entropy
	$(PY) -m pip install -q matplotlib
	touch $@

bench: build $(VENV)/.bench-installed
	@mkdir -p $(BENCH_OUT)
	@start=$$(date +%s); \
	$(PY) -m pytest benches/ --benchmark-only -rs -p no:cacheprovider --benchmark-json=$(BENCH_OUT)/bench.json \
		$(BENCH_ARGS) $(PYTEST_ARGS); rc=$$?; \
	echo "bench: pytest finished in $$(( $$(date +%s) - start )) s (rc=$$rc)"; \
	$(PY) benches/report.py $(BENCH_OUT)/bench.json --out $(BENCH_OUT)/report.md || rc=1; \
	exit $$rc

clean:
	rm -rf build lpc_kernels/_C*.so .pytest_cache .benchmarks
