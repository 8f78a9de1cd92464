"""linear_token_logprobs: log p(label) from hidden states and the LM head, ``[N, V]`` logits never held.

Implementations (all return fp32 log-probs ``[N]``; backward gets the same upstream gradient ``[N]``):
  eager           ``log_softmax((hidden @ weight.T).float()).gather(label)``
  compile         ``torch.compile`` of eager (``dynamic=False``)
  liger           ``-LigerFusedLinearCrossEntropyLoss(reduction="none")`` (Triton: GPU only)
  cce             ``-cut_cross_entropy.linear_cross_entropy(reduction="none")``, impl ``cce`` on GPU,
                  ``torch_compile`` on CPU (library defaults otherwise, e.g. ``filter_eps="high"``)
  torch_chunked   ``-torch.nn.functional.linear_cross_entropy(reduction="none",
                  options=torch.nn.LinearCrossEntropyOptions())``: PyTorch's own chunked path, auto options
  trl             TRL's ``trl.kernels.ChunkedLogProbFunction`` (what ``add_fused_lm_head`` runs), log-probs only,
                  TRL's chunk size
  ours_<backend>  ``lpc_kernels.linear_token_logprobs(backend=...)``, default chunk size
                  (``ours_reference``, the pure-PyTorch oracle, at the target shape only)
  *_frozen        the same with a frozen head (``weight`` without grad, as under LoRA): ``eager_frozen``,
                  ``ours_<backend>_frozen`` (the frozen-head path: the hidden gradient's factor in the forward)
  ours_triton_<v> the triton backend with backward variant ``v`` (``split``: deterministic, per V chunk a
                  logits-gradient kernel and two gradient products; ``atomic``: one kernel with fp32
                  atomics), set through ``LPC_TRITON_LINEAR_BWD`` around each backward
No label is ignored (``ignore_index`` rows would be skipped by ours and by CCE, not by eager).
"""

import contextlib
import os
import sys

import pytest
import torch

import _common as C
from _common import Shape

OP = "linear_token_logprobs"
CHECK_IMPL = "eager"


def _s(n, h, v, dtype, rounds, quick=False, tags=()):
    return Shape(f"N{n}-H{h}-V{v}", {"N": n, "H": h, "V": v}, dtype, rounds, quick, tags)


SHAPES = C.shapes_for(
    cpu=[_s(4096, 512, 32000, "float32", 2, quick=True, tags=("target",)),
         _s(1024, 512, 32000, "float32", 3),
         _s(1024, 512, 8000, "float32", 5)],
    gpu=[_s(16384, 4096, 128256, "bfloat16", 10, quick=True, tags=("target",)),
         _s(4096, 4096, 128256, "bfloat16", 10),
         _s(16384, 4096, 32000, "bfloat16", 10)],
)
TRITON_BWD_VARIANTS = ("split", "atomic")  # lpc_kernels.triton.linear_token_logprobs.BWD_VARIANTS
# trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16 (vocabulary columns per tile); read from the source, as
# importing trl.trainer needs TRL's full dependency set
TRL_CHUNK_SIZE = 32768
IMPLS = (["eager"]
         + [impl for b in C.OURS_BACKENDS[:-1]
            for impl in ([f"ours_triton_{v}" for v in TRITON_BWD_VARIANTS] if b == "triton" else [f"ours_{b}"])]
         + ["eager_frozen"] + [f"ours_{b}_frozen" for b in C.OURS_BACKENDS[:-1]]
         + ["torch_chunked", "trl", "cce", "liger", "compile"] + [f"ours_{C.OURS_BACKENDS[-1]}"])


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def make_inputs(shape: Shape) -> dict:
    n, h, v = shape.dims["N"], shape.dims["H"], shape.dims["V"]
    g = C.generator(0)
    dt = shape.torch_dtype
    hidden = torch.randn(n, h, generator=g, device=C.DEVICE).to(dt).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=C.DEVICE) * 0.02).to(dt).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=C.DEVICE)
    grad = torch.randn(n, generator=g, device=C.DEVICE)
    return {"hidden": hidden, "weight": weight, "labels": labels, "grad": grad}


def eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def build(impl: str, shape: Shape, x: dict) -> C.Case:
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    info = {}
    if impl.endswith("_frozen"):
        frozen = weight.detach()
        info["frozen_head"] = True
        if impl == "eager_frozen":
            fwd = lambda: eager(hidden, frozen, labels)  # noqa: E731
        else:
            backend = C.ours_backend(impl)
            C.require_ours(backend)
            import lpc_kernels as lk

            info["backend"] = backend
            fwd = lambda: lk.linear_token_logprobs(hidden, frozen, labels, backend=backend)  # noqa: E731
        return C.Case(forward=fwd, backward=C.backward_with(x["grad"]), params=[hidden], info=info)
    if impl == "eager":
        fwd = lambda: eager(hidden, weight, labels)  # noqa: E731
    elif impl == "torch_chunked":
        F = torch.nn.functional
        if not hasattr(F, "linear_cross_entropy"):
            raise C.Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        options = torch.nn.LinearCrossEntropyOptions()
        fwd = lambda: -F.linear_cross_entropy(hidden, weight, labels, reduction="none", options=options)  # noqa: E731
    elif impl == "trl":
        kernels = C.require_module("trl.kernels", "trl")
        chunk = TRL_CHUNK_SIZE
        info["chunk_size"] = chunk
        fwd = lambda: kernels.ChunkedLogProbFunction.apply(  # noqa: E731
            hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())[0]
    elif impl == "compile":
        fn = C.compiled(eager)
        fwd = lambda: fn(hidden, weight, labels)  # noqa: E731
    elif impl == "liger":
        C.require_cuda("Liger-Kernel's fused linear cross entropy")
        lk = C.require_module("liger_kernel.transformers", "liger-kernel")
        loss = lk.LigerFusedLinearCrossEntropyLoss(reduction="none")
        fwd = lambda: -loss(weight, hidden, labels)  # noqa: E731
    elif impl == "cce":
        cce = C.require_module("cut_cross_entropy", "cut-cross-entropy")
        name = C.cce_impl_name()
        info["cce_impl"] = name
        fwd = lambda: -cce.linear_cross_entropy(hidden, weight, labels, reduction="none", impl=name)  # noqa: E731
    elif impl.startswith("ours_"):
        backend = C.ours_backend(impl)
        C.require_ours(backend)
        import lpc_kernels as lk

        info["backend"] = backend
        fwd = lambda: lk.linear_token_logprobs(hidden, weight, labels, backend=backend)  # noqa: E731
        variant = impl.split("_", 2)[2] if impl.count("_") >= 2 else None
        if variant is not None:
            if variant not in TRITON_BWD_VARIANTS:
                raise ValueError(impl)
            info["bwd_variant"] = variant
            plain = C.backward_with(x["grad"])

            def bwd(out):
                with _env("LPC_TRITON_LINEAR_BWD", variant):
                    plain(out)

            return C.Case(forward=fwd, backward=bwd, params=[hidden, weight], info=info)
    else:
        raise ValueError(impl)
    return C.Case(forward=fwd, backward=C.backward_with(x["grad"]), params=[hidden, weight], info=info)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, IMPLS, sweep_skip=("ours_reference",)))
def test_linear_token_logprobs(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode)
