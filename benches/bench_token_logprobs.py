"""token_logprobs: log p(label) from materialised logits ``[N, V]``.

Implementations (all return fp32 log-probs ``[N]``; backward gets the same upstream gradient ``[N]``):
  eager                  ``log_softmax(logits.float()).gather(label)``
  compile                ``torch.compile`` of eager (``dynamic=False``)
  liger                  ``-LigerCrossEntropyLoss(reduction="none")`` (Triton: GPU only). It writes its
                         gradient into the logits during the forward, so it gets its own copy of them.
  ours_<backend>         ``lpc_kernels.token_logprobs(backend=...)`` (``ours_reference`` at the target shape only)
  ours_<backend>_inplace the same with ``inplace_backward=True`` (gradient written into the logits buffer;
                         own copy of the logits, like liger)
``test_copy_bandwidth`` times ``dst.copy_(logits)`` at the same shapes: the report divides the bytes a
fused fwd+bwd must move (read logits twice, write the gradient once) by our time and compares with it.
"""

import sys

import pytest
import torch

import _common as C
from _common import Shape

OP = "token_logprobs"
CHECK_IMPL = "eager"


def _s(n, v, dtype, rounds, quick=False, tags=()):
    return Shape(f"N{n}-V{v}", {"N": n, "V": v}, dtype, rounds, quick, tags)


SHAPES = C.shapes_for(
    cpu=[_s(4096, 32000, "float32", 5, quick=True, tags=("target",)),
         _s(1024, 32000, "float32", 5),
         _s(4096, 8000, "float32", 5)],
    gpu=[_s(16384, 128256, "bfloat16", 10, quick=True, tags=("target",)),
         _s(4096, 128256, "bfloat16", 10),
         _s(16384, 32000, "bfloat16", 10)],
)
IMPLS = (["eager"] + [f"ours_{b}{v}" for b in C.OURS_BACKENDS[:-1] for v in ("", "_inplace")]
         + ["liger", "compile", f"ours_{C.OURS_BACKENDS[-1]}"])


def make_inputs(shape: Shape) -> dict:
    n, v = shape.dims["N"], shape.dims["V"]
    g = C.generator(0)
    logits = (torch.randn(n, v, generator=g, device=C.DEVICE) * 2.0).to(shape.torch_dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=C.DEVICE)
    grad = torch.randn(n, generator=g, device=C.DEVICE)
    return {"logits": logits, "labels": labels, "grad": grad}


def eager(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def _own_copy(logits):
    return logits.detach().clone().requires_grad_()


def build(impl: str, shape: Shape, x: dict) -> C.Case:
    logits, labels = x["logits"], x["labels"]
    info = {}
    if impl == "eager":
        fwd = lambda: eager(logits, labels)  # noqa: E731
    elif impl == "compile":
        fn = C.compiled(eager)
        fwd = lambda: fn(logits, labels)  # noqa: E731
    elif impl == "liger":
        C.require_cuda("Liger-Kernel's cross entropy")
        lt = C.require_module("liger_kernel.transformers", "liger-kernel")
        loss = lt.LigerCrossEntropyLoss(reduction="none")
        logits = _own_copy(logits)
        fwd = lambda: -loss(logits, labels)  # noqa: E731
    elif impl.startswith("ours_"):
        backend = C.ours_backend(impl)
        C.require_ours(backend)
        import lpc_kernels as lk

        inplace = impl.endswith("_inplace")
        if inplace:
            logits = _own_copy(logits)
        info.update(backend=backend, inplace_backward=inplace)
        fwd = lambda: lk.token_logprobs(logits, labels, backend=backend, inplace_backward=inplace)  # noqa: E731
    else:
        raise ValueError(impl)
    return C.Case(forward=fwd, backward=C.backward_with(x["grad"]), params=[logits], info=info)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, ["copy"], modes=("fwd",)))
def test_copy_bandwidth(benchmark, request, shape, impl, mode):
    """Roofline: one read + one write of the logits (``dst.copy_(src)``)."""
    request.node.user_properties.append(("lpc_case", {"op": OP, "shape": shape.id, "impl": impl, "mode": mode}))
    C.skip_if_past_deadline()
    C.CACHE.drop_case()
    src = C.get_inputs(sys.modules[__name__], shape)["logits"].detach()
    dst = torch.empty_like(src)
    benchmark.group = f"{OP} {shape.id} copy"
    benchmark.extra_info.update(op=OP, shape=shape.id, dims=dict(shape.dims), dtype=shape.dtype, impl="copy",
                                kind="roofline", mode="copy", device=C.DEVICE.type, tags=list(shape.tags),
                                bytes_moved=2 * src.numel() * src.element_size(), check="n/a (roofline)")

    def target():
        dst.copy_(src)
        C.sync()

    target()
    benchmark.pedantic(target, rounds=max(shape.rounds, 10), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, IMPLS, sweep_skip=("ours_reference",)))
def test_token_logprobs(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode)
