"""Op contracts: argument checks, backend choice, ``torch.library`` custom ops, fake impls and autograd.

Each public op is one ``torch.library.custom_op`` in the ``lpc`` namespace whose last argument names
the backend (already resolved, so ``torch.compile`` sees a constant). Its body checks the values that
only real tensors can show (label range, NaN) and calls that backend's function; the backend modules
share the signatures documented in ``lpc_kernels.reference``. Backward passes are custom ops too, so a
compiled graph holds no Python. Metadata checks (shape, dtype, device, scalar ranges) run in the public
wrappers in ``lpc_kernels.__init__`` through the ``check_*`` functions below, before any kernel launches.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import _shapes, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")
LOSS_TYPES = ("dpo", "ipo", "simpo")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

# ------------------------------------------------------------------------------------------ backends
def _load_extension() -> Optional[str]:
    """Import lpc_kernels._C (it registers lpc::*_fwd/_bwd kernels for CPU and, in CUDA builds, CUDA).

    Returns None on success, else why not: the package works without it (reference, triton backends).
    """
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return "not built"
    try:
        importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError) as exc:  # e.g. built against another torch
        return f"import failed: {exc}"
    return None


_EXT_ERROR: Optional[str] = _load_extension()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Read once at import, so that resolve_backend stays traceable by torch.compile (plain constants).
_EXT_DISPATCH_KEYS = frozenset(
    key for key in ("CPU", "CUDA")
    if _EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("lpc::token_logprobs_fwd", key))
_TRITON_IMPORTABLE = _triton_importable()




def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if _EXT_ERROR is not None:
            return f"the C++ extension lpc_kernels._C is unavailable ({_EXT_ERROR}); run `make build`"
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors, got tensors on {device}"
        if backend.upper() not in _EXT_DISPATCH_KEYS:
            return f"lpc_kernels._C was built without {backend} kernels"
        return None
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            return "triton is not installed"
        if device.type == "cpu" and not _triton_interpreted():
            return "triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before import"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def available_backends() -> list[str]:
    """Backends usable in this process for at least one device (CPU, or CUDA when visible)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_unavailable_reason(b, d) is None for d in devices)]


# auto rule: on CUDA tensors the CUDA C++ kernels, then triton; on CPU the C++ kernels; reference last.
# CUDA C++ first because it measured faster on an H100 (bf16, N=16384, H=4096, V=128256: linear op
# fwd+bwd 108 ms vs triton 271 ms; token_logprobs equal; see benches/results/cuda).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` (``"auto"`` or a name) on tensors on ``device``.

    ``"auto"`` takes ``$LPC_KERNELS_BACKEND`` when set, else the first available of: on CUDA
    ``cuda``, ``triton``, ``reference``; on CPU ``cpu``, ``reference``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("LPC_KERNELS_BACKEND", "auto") or "auto"
        source = "environment variable LPC_KERNELS_BACKEND"
    else:
        source = "backend"
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if _unavailable_reason(candidate, device) is None:
                return candidate
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{source}={backend!r} is not available: {reason}")
    return backend


def backend_module(backend: str):
    if backend == "reference":
        return reference
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend
    from . import _cpp

    return _cpp


# -------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, dtypes=FLOAT_DTYPES, ndim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(named: dict) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def _check_int(name: str, value, low: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_float(name: str, value, *, positive: bool = False, low: Optional[float] = None,
                 high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _check_labels(labels: Tensor, lead_shape, lead_name: str) -> None:
    _check_tensor("labels", labels, INDEX_DTYPES)
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (the leading dims of {lead_name}), "
                         f"got {tuple(labels.shape)}")


def check_token_logprobs(logits, labels, ignore_index) -> None:
    _check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[:-1], "logits")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}): nothing to score")
    _check_int("ignore_index", ignore_index)
    _check_same_device({"logits": logits, "labels": labels})


def check_linear_token_logprobs(hidden, weight, labels, bias, ignore_index, chunk_size, filter_eps=0.0, *,
                                weight_name="weight", bias_name="bias", vocab="V") -> None:
    """The names are the caller's (the vocab-parallel op checks ``weight_shard`` [V_local, H])."""
    _check_tensor("hidden", hidden)
    _check_tensor(weight_name, weight, ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight_name}.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{weight_name} must have shape [{vocab}, H] with {vocab}, H > 0, got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
    if bias is not None:
        _check_tensor(bias_name, bias, (weight.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape [{vocab}] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_labels(labels, hidden.shape[:-1], "hidden")
    if labels.numel() == 0:
        raise ValueError(f"hidden is empty (shape {tuple(hidden.shape)}): nothing to score")
    _check_int("ignore_index", ignore_index)
    _check_int("chunk_size", chunk_size, low=1)
    _check_float("filter_eps", filter_eps, low=0.0, high=1.0)
    _check_same_device({"hidden": hidden, weight_name: weight, bias_name: bias, "labels": labels})


def check_gumbel_softmax_codes(logits, codebook, tau, hard, seed, offset) -> None:
    _check_tensor("logits", logits, ndim=2)
    _check_tensor("codebook", codebook, ndim=2)
    if logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [B, K] with B > 0, got {tuple(logits.shape)}")
    if logits.shape[1] != codebook.shape[0] or codebook.shape[0] == 0:
        raise ValueError(f"codebook must have shape [K, D] with K = logits.shape[1] = {logits.shape[1]} > 0, "
                         f"got {tuple(codebook.shape)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook must have shape [K, D] with D > 0, got {tuple(codebook.shape)}")
    _check_float("tau", tau, positive=True)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    _check_int("seed", seed, low=0)
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    _check_int("offset", offset, low=0)
    if offset + logits.numel() >= 2**63:
        raise ValueError(f"offset + B*K must be < 2**63, got offset={offset}")
    _check_same_device({"logits": logits, "codebook": codebook})


def check_preference_loss(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing,
                          kl_weight, ipo_average) -> None:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    _check_tensor("policy_chosen_logps", pc, ndim=1)
    b = pc.shape[0]
    if b == 0:
        raise ValueError("policy_chosen_logps is empty: preference_loss needs at least one pair")
    named = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc,
             "ref_rejected_logps": rr}
    for name, t in named.items():
        if t is not None:
            _check_tensor(name, t, ndim=1)
            if t.shape[0] != b:
                raise ValueError(f"{name} must have shape [B] = [{b}] like policy_chosen_logps, got {tuple(t.shape)}")
    if pr is None:
        raise TypeError("policy_rejected_logps is required")
    if (rc is None) != (rr is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    if loss_type in ("dpo", "ipo") and rc is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    if loss_type == "simpo" and rc is not None:
        raise ValueError("loss_type='simpo' is reference-free: do not pass ref_chosen_logps/ref_rejected_logps")
    need_lengths = loss_type == "simpo" or (loss_type == "ipo" and ipo_average)
    for name, t in (("chosen_lengths", cl), ("rejected_lengths", rl)):
        if t is None:
            if need_lengths:
                raise ValueError(f"{name} is required for loss_type={loss_type!r}"
                                 + (" with ipo_average=True" if loss_type == "ipo" else ""))
            continue
        _check_tensor(name, t, FLOAT_DTYPES + INDEX_DTYPES, ndim=1)
        if t.shape[0] != b:
            raise ValueError(f"{name} must have shape [B] = [{b}], got {tuple(t.shape)}")
        named[name] = t
    if (prior is None) != (post is None):
        raise ValueError("prior_logits and posterior_logits must be given together")
    if prior is not None:
        _check_tensor("prior_logits", prior, ndim=2)
        _check_tensor("posterior_logits", post, ndim=2)
        if prior.shape != post.shape or prior.shape[0] != b or prior.shape[1] == 0:
            raise ValueError(f"prior_logits and posterior_logits must both have shape [B, K] with B = {b}, "
                             f"K > 0; got {tuple(prior.shape)} and {tuple(post.shape)}")
        named["prior_logits"], named["posterior_logits"] = prior, post
    _check_float("beta", beta, positive=True)
    _check_float("gamma", gamma)
    if loss_type != "simpo" and gamma != 0.0:
        raise ValueError(f"gamma (the SimPO margin) must be 0 for loss_type={loss_type!r}, got {gamma}")
    _check_float("label_smoothing", label_smoothing, low=0.0, high=0.5)
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing must be 0 for loss_type='ipo', got {label_smoothing}")
    _check_float("kl_weight", kl_weight, low=0.0)
    if kl_weight > 0 and prior is None:
        raise ValueError(f"kl_weight={kl_weight} > 0 needs prior_logits and posterior_logits")
    if not isinstance(ipo_average, bool):
        raise TypeError(f"ipo_average must be a bool, got {type(ipo_average).__name__}")
    _check_same_device(named)


def _raise_if_bad_values(named: dict, positive: tuple = ()) -> None:
    """NaN/inf in any float tensor of ``named``, then values <= 0 in the ``positive`` ones (lengths): one host
    sync for all checks; the per-tensor loop below runs only to name the culprit."""
    floats = [t for t in named.values() if t is not None and t.is_floating_point()]
    flags = [torch.isfinite(t).all() for t in floats] + [(named[n] > 0).all() for n in positive
                                                         if named[n] is not None]
    if not flags or bool(torch.stack(flags).all()):
        return
    for name, t in named.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    for name in positive:
        t = named[name]
        if t is not None and not bool((t > 0).all()):
            raise ValueError(f"{name} must be > 0 (response token counts), got min {t.min().item()}")


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, got {value}")


# ---------------------------------------------------------------------------------- token_logprobs
@torch.library.custom_op("lpc::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ignore_index: int, inplace_backward: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """logits [N, V], labels [N] -> (logp [N], lse [N]) in fp32 (fp64 for fp64 logits)."""
    _check_label_values(labels, logits.shape[1], ignore_index)
    return backend_module(backend).token_logprobs_fwd(logits, labels, ignore_index)


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, inplace_backward, backend):
    return _shapes.row_logprobs(logits)


@torch.library.custom_op("lpc::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                               ignore_index: int, backend: str) -> Tensor:
    return backend_module(backend).token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, False)


@token_logprobs_backward_op.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("lpc::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_inplace_op(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                                       ignore_index: int, backend: str) -> None:
    """Writes d logp / d logits into ``logits`` (its forward values are dead after this)."""
    backend_module(backend).token_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, True)


@token_logprobs_backward_inplace_op.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, backend):
    return None


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, ignore_index, inplace_backward, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.inplace, ctx.backend = ignore_index, inplace_backward, backend
    ctx.mark_non_differentiable(output[1])


def _token_logprobs_backward(ctx, grad_logp, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    grad_logp = grad_logp.contiguous()
    if ctx.inplace:
        token_logprobs_backward_inplace_op(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.backend)
        grad = logits
    else:
        grad = token_logprobs_backward_op(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.backend)
    return grad, None, None, None, None


token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


# --------------------------------------------------------------------------- linear_token_logprobs
@torch.library.custom_op("lpc::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             ignore_index: int, chunk_size: int, backend: str,
                             filter_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, labels [N] -> (logp [N], lse [N]), fp32."""
    _check_label_values(labels, weight.shape[0], ignore_index)
    return backend_module(backend).linear_token_logprobs_fwd(hidden, weight, bias, labels, ignore_index,
                                                             chunk_size)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_size, backend, filter_eps=0.0):
    return _shapes.row_logprobs(hidden)


@torch.library.custom_op("lpc::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                      labels: Tensor, lse: Tensor, ignore_index: int, chunk_size: int,
                                      need_hidden: bool, need_weight: bool, need_bias: bool,
                                      backend: str, filter_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight, bias; a tensor of shape [0] stands for one not asked for.

    ``filter_eps > 0`` lets the triton backend skip logits tiles whose softmax mass is below it (error
    bounded by ``|g| * filter_eps`` per skipped entry); the other backends compute the exact gradient.
    """
    grads = backend_module(backend).linear_token_logprobs_bwd(
        grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
        need_bias, filter_eps=filter_eps)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, ignore_index, chunk_size, need_hidden, need_weight,
      need_bias, backend, filter_eps=0.0):
    return _shapes.linear_token_logprobs_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, chunk_size, backend, filter_eps = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.ignore_index, ctx.chunk_size, ctx.backend, ctx.filter_eps = ignore_index, chunk_size, backend, filter_eps
    ctx.mark_non_differentiable(output[1])


def _linear_backward(ctx, grad_logp, grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_h or need_w or need_b):
        return (None,) * 8
    gh, gw, gb = linear_token_logprobs_backward_op(
        grad_logp.contiguous(), hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_size,
        need_h, need_w, bool(need_b and bias is not None), ctx.backend, ctx.filter_eps)
    return (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None,
            None, None, None, None, None)


linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------------------- gumbel_softmax_codes
@torch.library.custom_op("lpc::gumbel_softmax_codes", mutates_args=())
def gumbel_softmax_codes_op(logits: Tensor, codebook: Tensor, tau: float, hard: bool, seed: int, offset: int,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, K], codebook [K, D] -> (weights [B, K] fp32, z [B, D] codebook dtype, soft [B, K] fp32).

    ``soft`` (the pre-argmax sample, needed by the straight-through backward) is ``[0]``-shaped unless
    ``hard``: for soft samples it equals ``weights``.
    """
    _raise_if_bad_values({"logits": logits})
    weights, z, soft = backend_module(backend).gumbel_softmax_fwd(logits, codebook, tau, hard, seed, offset)
    return weights, z, soft if soft is not None else weights.new_empty(0)


@gumbel_softmax_codes_op.register_fake
def _(logits, codebook, tau, hard, seed, offset, backend):
    return _shapes.gumbel_softmax_outputs(logits, codebook, hard)


@torch.library.custom_op("lpc::gumbel_softmax_codes_backward", mutates_args=())
def gumbel_softmax_codes_backward_op(grad_weights: Tensor, grad_z: Tensor, weights: Tensor, soft: Tensor,
                                     codebook: Tensor, tau: float, need_logits: bool, need_codebook: bool,
                                     backend: str) -> tuple[Tensor, Tensor]:
    """``soft`` is the forward's third output: ``[0]``-shaped for soft samples (then ``weights`` is used)."""
    g_logits, g_codebook = backend_module(backend).gumbel_softmax_bwd(
        grad_weights, grad_z, weights, soft if soft.numel() else None, codebook, tau, need_logits, need_codebook)
    return (g_logits if g_logits is not None else soft.new_empty(0),
            g_codebook if g_codebook is not None else soft.new_empty(0))


@gumbel_softmax_codes_backward_op.register_fake
def _(grad_weights, grad_z, weights, soft, codebook, tau, need_logits, need_codebook, backend):
    return _shapes.gumbel_softmax_grads(weights, codebook, need_logits, need_codebook)


def _gumbel_setup(ctx, inputs, output):
    logits, codebook, tau, hard, seed, offset, backend = inputs
    weights, _, soft = output
    ctx.save_for_backward(weights, soft, codebook)
    ctx.tau, ctx.backend, ctx.logits_dtype = tau, backend, logits.dtype
    ctx.mark_non_differentiable(soft)


def _gumbel_backward(ctx, grad_weights, grad_z, grad_soft):
    weights, soft, codebook = ctx.saved_tensors
    need_logits, need_codebook = ctx.needs_input_grad[:2]
    if not (need_logits or need_codebook):
        return None, None, None, None, None, None, None
    grad_weights = torch.zeros_like(weights) if grad_weights is None else grad_weights.contiguous()
    grad_z = torch.zeros(weights.shape[0], codebook.shape[1], dtype=codebook.dtype, device=codebook.device) \
        if grad_z is None else grad_z.contiguous()
    g_logits, g_codebook = gumbel_softmax_codes_backward_op(
        grad_weights, grad_z, weights, soft, codebook, ctx.tau, need_logits, need_codebook, ctx.backend)
    return (g_logits.to(ctx.logits_dtype) if need_logits else None, g_codebook if need_codebook else None,
            None, None, None, None, None)


gumbel_softmax_codes_op.register_autograd(_gumbel_backward, setup_context=_gumbel_setup)


# --------------------------------------------------------------------------------- preference_loss
@torch.library.custom_op("lpc::preference_loss", mutates_args=())
def preference_loss_op(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                       ref_chosen_logps: Optional[Tensor], ref_rejected_logps: Optional[Tensor],
                       chosen_lengths: Optional[Tensor], rejected_lengths: Optional[Tensor],
                       prior_logits: Optional[Tensor], posterior_logits: Optional[Tensor], loss_type: str,
                       beta: float, gamma: float, label_smoothing: float, kl_weight: float, ipo_average: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B pairs -> (loss [], losses [B], chosen_rewards [B], rejected_rewards [B], kl [B]), fp32."""
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
            rejected_lengths, prior_logits, posterior_logits)
    _raise_if_bad_values(dict(zip(_PREF_INPUT_NAMES, args)), positive=("chosen_lengths", "rejected_lengths"))
    return backend_module(backend).preference_loss_fwd(*args, loss_type, beta, gamma, label_smoothing,
                                                       kl_weight, ipo_average)


_PREF_INPUT_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                     "chosen_lengths", "rejected_lengths", "prior_logits", "posterior_logits")


@preference_loss_op.register_fake
def _(pc, pr, rc, rr, cl, rl, prior, post, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average,
      backend):
    return _shapes.preference_loss_outputs(pc)


@torch.library.custom_op("lpc::preference_loss_backward", mutates_args=())
def preference_loss_backward_op(grad_loss: Tensor, grad_losses: Tensor, grad_chosen_rewards: Tensor,
                                grad_rejected_rewards: Tensor, grad_kl: Tensor, policy_chosen_logps: Tensor,
                                policy_rejected_logps: Tensor, ref_chosen_logps: Optional[Tensor],
                                ref_rejected_logps: Optional[Tensor], chosen_lengths: Optional[Tensor],
                                rejected_lengths: Optional[Tensor], prior_logits: Optional[Tensor],
                                posterior_logits: Optional[Tensor], loss_type: str, beta: float, gamma: float,
                                label_smoothing: float, kl_weight: float, ipo_average: bool,
                                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (pc, pr, rc, rr, prior, post); a [0]-shaped tensor stands for an absent input."""
    grads = backend_module(backend).preference_loss_bwd(
        grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_kl, policy_chosen_logps,
        policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
        prior_logits, posterior_logits, loss_type, beta, gamma, label_smoothing, kl_weight, ipo_average)
    g = [grads[i] for i in (0, 1, 2, 3, 6, 7)]
    return tuple(t if t is not None else policy_chosen_logps.new_empty(0) for t in g)


@preference_loss_backward_op.register_fake
def _(g_loss, g_losses, g_cr, g_rj, g_kl, pc, pr, rc, rr, cl, rl, prior, post, *rest):
    return _shapes.preference_loss_grads(pc, pr, rc, rr, prior, post)


def _pref_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.options = inputs[8:]


def _pref_backward(ctx, g_loss, g_losses, g_cr, g_rj, g_kl):
    saved = ctx.saved_tensors
    pc = saved[0]
    dt = reference.compute_dtype(pc)
    b = pc.shape[0]

    def _grad(g, shape):
        return torch.zeros(shape, dtype=dt, device=pc.device) if g is None else g.to(dt).contiguous()

    grads = preference_loss_backward_op(_grad(g_loss, ()), _grad(g_losses, b), _grad(g_cr, b), _grad(g_rj, b),
                                        _grad(g_kl, b), *saved, *ctx.options)
    d_pc, d_pr, d_rc, d_rr, d_prior, d_post = grads
    need = ctx.needs_input_grad
    out = [d_pc, d_pr, d_rc, d_rr, None, None, d_prior, d_post]
    return tuple(o if o is not None and need[i] and saved[i] is not None else None for i, o in enumerate(out)) \
        + (None,) * 7


preference_loss_op.register_autograd(_pref_backward, setup_context=_pref_setup)
