"""gumbel_softmax_codes: soft Gumbel-softmax weights over K codes and the latent ``z = w @ E``.

Implementations (``logits [B, K]``, ``codebook [K, D]``, tau = 1, soft samples; backward through ``z``
with a fixed upstream gradient, as in LPC where ``z`` feeds the LM head):
  eager           ``w = F.gumbel_softmax(logits.float(), tau); z = w.to(E.dtype) @ E``
  compile         ``torch.compile`` of eager (``dynamic=False``)
  ours_<backend>  ``lpc_kernels.gumbel_softmax_codes(backend=...)`` (counter-based Philox noise)
Eager draws its noise from torch's generator, so only our backends are compared by value (with
``ours_reference``, which draws the same Philox noise); eager and compile are checked for finiteness.
No peer library ships a Gumbel-softmax kernel.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import _common as C
from _common import Shape

OP = "gumbel_softmax_codes"


def CHECK_IMPL(impl):  # noqa: N802 (a callable oracle choice)
    return "ours_reference" if impl.startswith("ours_") else None


def _s(b, k, d, dtype, rounds, quick=False, tags=(), memory=True):
    return Shape(f"B{b}-K{k}-D{d}", {"B": b, "K": k, "D": d}, dtype, rounds, quick, tags, memory)


SHAPES = C.shapes_for(
    cpu=[_s(64, 64, 512, "float32", 30, quick=True, tags=("target",), memory=False),
         _s(4096, 64, 512, "float32", 20)],
    gpu=[_s(64, 64, 4096, "bfloat16", 100, quick=True, tags=("target",)),
         _s(16384, 64, 4096, "bfloat16", 50)],
)
IMPLS = ["eager"] + [f"ours_{b}" for b in C.OURS_BACKENDS] + ["compile"]


def make_inputs(shape: Shape) -> dict:
    b, k, d = shape.dims["B"], shape.dims["K"], shape.dims["D"]
    g = C.generator(0)
    dt = shape.torch_dtype
    logits = torch.randn(b, k, generator=g, device=C.DEVICE).to(dt).requires_grad_()
    codebook = (torch.randn(k, d, generator=g, device=C.DEVICE) * 0.02).to(dt).requires_grad_()
    grad_z = torch.randn(b, d, generator=g, device=C.DEVICE).to(dt)
    return {"logits": logits, "codebook": codebook, "grad_z": grad_z}


def eager(logits, codebook):
    w = F.gumbel_softmax(logits.float(), tau=1.0, hard=False)
    return w, w.to(codebook.dtype) @ codebook


def build(impl: str, shape: Shape, x: dict) -> C.Case:
    logits, codebook, grad_z = x["logits"], x["codebook"], x["grad_z"]
    info = {}
    check = "value"
    if impl == "eager":
        fwd = lambda: eager(logits, codebook)  # noqa: E731
        check = "finite"
    elif impl == "compile":
        fn = C.compiled(eager)
        fwd = lambda: fn(logits, codebook)  # noqa: E731
        check = "finite"
    elif impl.startswith("ours_"):
        backend = C.ours_backend(impl)
        C.require_ours(backend)
        import lpc_kernels as lk

        info["backend"] = backend
        fwd = lambda: lk.gumbel_softmax_codes(logits, codebook, tau=1.0, hard=False, seed=1234, offset=0,  # noqa: E731
                                              backend=backend)
    else:
        raise ValueError(impl)

    def bwd(out):
        out[1].backward(grad_z)

    return C.Case(forward=fwd, backward=bwd, params=[logits, codebook], value=lambda out: out[1], check=check,
                  info=info)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES, IMPLS))
def test_gumbel_softmax_codes(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode)
