# TRITON_INTERPRET must be set before any @triton.jit function is created: the triton backend then runs
# on CPU tensors through the interpreter, so the whole suite runs on a CPU-only machine.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_here = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_here, "..", ".cache", "inductor"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_here, "..", ".cache", "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

from lpc_kernels.backends import unavailable_reason  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer cache (``--cache-dir``) for the whole session: the synthetic tokenizer is trained once,
    into a tmp dir (never the user's ~/.cache), then only read."""
    return str(tmp_path_factory.mktemp("lpc-cache"))


@pytest.fixture
def cuda_backend():
    """For tests marked with ``tests.helpers.backend_checks.on_cuda``: a GPU is present (else they skip), so the
    cuda backend must be available; seeds the GPU generator."""
    reason = unavailable_reason("cuda", torch.device("cuda"))
    assert reason is None, f"GPU present but the cuda backend is unavailable: {reason}"
    torch.cuda.manual_seed_all(0)
