"""preference_loss: DPO / IPO / SimPO pair loss plus LPC's ``kl_weight * KL(q || p)``, and the fused
"LM head + preference loss" path that Liger-Kernel's chunked losses implement.

``test_preference_loss`` (the op on per-sequence log-probs ``[B]`` and prior/posterior logits ``[B, K]``):
  eager           TRL's formulas (``dpo_loss`` / IPO with length-averaged log-probs / CPO's SimPO), rewards,
                  and ``KL = sum softmax(post) * (log_softmax(post) - log_softmax(prior))``, mean over pairs
  compile         ``torch.compile`` of eager (``dynamic=False``)
  ours_<backend>  ``lpc_kernels.preference_loss(backend=...)``
  Settings: beta 0.1 (dpo, ipo) / 2.0 (simpo), gamma 0.5 (simpo), kl_weight 0.05, K = 64.
  Liger and CCE have no kernel for this op on log-probs; their fused versions are benchmarked below.

``test_fused_linear_preference`` (policy and reference hidden states ``[2B, T, H]`` + LM heads ``[V, H]``
-> loss, gradients to the policy hidden states and head; chosen rows first, prompt positions ignored):
  eager           ``log_softmax((h @ W.T).float()).gather`` summed per sequence (reference under
                  ``no_grad``), then the TRL loss
  compile         ``torch.compile`` of that eager step
  liger           ``LigerFusedLinearDPOLoss`` / ``LigerFusedLinearSimPOLoss`` (``compute_nll_loss=False``
                  so it computes the same loss; chunked PyTorch + torch.compile, runs on CPU too)
  composed_<b>    today's composition: ``lpc_kernels.sequence_logprobs`` (policy and reference) +
                  ``lpc_kernels.preference_loss`` (4 GEMMs for the policy: the backward recomputes the logits)
  ours_<backend>  ``lpc_kernels.linear_preference_loss`` (gradients computed in the forward, 3 GEMMs; the reference
                  log-probs through ``sequence_logprobs`` under ``no_grad``); ``fwd`` includes the gradients
  No latent here (kl_weight = 0): Liger has no LPC term; the LPC step is in bench_train_step.py.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import _common as C
from _common import Shape

OP = "preference_loss"
CHECK_IMPL = "eager"
BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}
GAMMA = 0.5
KL_WEIGHT = 0.05


def _s(loss, b, k, dtype, rounds, quick=False, tags=(), memory=True):
    return Shape(f"{loss}-B{b}-K{k}", {"loss": loss, "B": b, "K": k}, dtype, rounds, quick, tags, memory)


SHAPES = C.shapes_for(
    cpu=[_s("dpo", 64, 64, "float32", 30, quick=True, tags=("target",), memory=False),
         _s("ipo", 64, 64, "float32", 30, memory=False),
         _s("simpo", 64, 64, "float32", 30, memory=False),
         _s("dpo", 16384, 64, "float32", 20)],
    gpu=[_s("dpo", 64, 64, "bfloat16", 100, quick=True, tags=("target",)),
         _s("ipo", 64, 64, "bfloat16", 100),
         _s("simpo", 64, 64, "bfloat16", 100),
         _s("dpo", 65536, 64, "bfloat16", 50)],
)
IMPLS = ["eager"] + [f"ours_{b}" for b in C.OURS_BACKENDS] + ["compile"]


def make_inputs(shape: Shape) -> dict:
    if "T" in shape.dims:
        return _make_linear_inputs(shape)
    b, k = shape.dims["B"], shape.dims["K"]
    g = C.generator(0)
    lengths = lambda: torch.randint(16, 512, (b,), generator=g, device=C.DEVICE)  # noqa: E731
    logp = lambda n: (-torch.rand(b, generator=g, device=C.DEVICE) * n)  # noqa: E731
    x = {"pc": logp(200).requires_grad_(), "pr": logp(200).requires_grad_(), "rc": logp(200), "rr": logp(200),
         "cl": lengths(), "rl": lengths()}
    for name in ("prior", "post"):
        x[name] = torch.randn(b, k, generator=g, device=C.DEVICE).to(shape.torch_dtype).requires_grad_()
    return x


def eager_loss(pc, pr, rc, rr, cl, rl, prior, post, loss_type: str, beta: float):
    """TRL-style: DPOTrainer.dpo_loss (sigmoid / ipo) and CPOTrainer's simpo, plus the LPC KL term."""
    if loss_type == "dpo":
        chosen_logratios, rejected_logratios = pc - rc, pr - rr
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
        chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    elif loss_type == "ipo":
        chosen_logratios, rejected_logratios = (pc - rc) / cl, (pr - rr) / rl
        losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    else:  # simpo (reference free)
        chosen_avg, rejected_avg = pc / cl, pr / rl
        losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg - GAMMA / beta))
        chosen_rewards, rejected_rewards = beta * chosen_avg.detach(), beta * rejected_avg.detach()
    log_q = torch.log_softmax(post.float(), dim=-1)
    log_p = torch.log_softmax(prior.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    loss = (losses + KL_WEIGHT * kl).mean()
    return loss, chosen_rewards, rejected_rewards


def build_plain(impl: str, shape: Shape, x: dict) -> C.Case:
    lt = shape.dims["loss"]
    beta = BETA[lt]
    ref = (x["rc"], x["rr"]) if lt != "simpo" else (None, None)
    args = (x["pc"], x["pr"], x["rc"], x["rr"], x["cl"], x["rl"], x["prior"], x["post"])
    info = {"loss_type": lt, "beta": beta, "kl_weight": KL_WEIGHT}
    if impl == "eager":
        fwd = lambda: eager_loss(*args, lt, beta)[0]  # noqa: E731
    elif impl == "compile":
        fn = C.compiled(eager_loss)
        fwd = lambda: fn(*args, lt, beta)[0]  # noqa: E731
    elif impl.startswith("ours_"):
        backend = C.ours_backend(impl)
        C.require_ours(backend)
        import lpc_kernels as lk

        info["backend"] = backend
        fwd = lambda: lk.preference_loss(  # noqa: E731
            x["pc"], x["pr"], *ref, chosen_lengths=x["cl"], rejected_lengths=x["rl"], prior_logits=x["prior"],
            posterior_logits=x["post"], loss_type=lt, beta=beta, gamma=GAMMA if lt == "simpo" else 0.0,
            kl_weight=KL_WEIGHT, backend=backend).loss
    else:
        raise ValueError(impl)
    return C.Case(forward=fwd, backward=C.backward_scalar,
                  params=[x["pc"], x["pr"], x["prior"], x["post"]], info=info)


# ------------------------------------------------------------------------ fused LM head + preference loss
def _l(loss, b, t, h, v, dtype, rounds, quick=False):
    return Shape(f"{loss}-B{b}-T{t}-H{h}-V{v}", {"loss": loss, "B": b, "T": t, "H": h, "V": v, "N": 2 * b * t},
                 dtype, rounds, quick)


LINEAR_SHAPES = C.shapes_for(
    cpu=[_l("dpo", 8, 256, 512, 32000, "float32", 3, quick=True), _l("dpo", 2, 128, 256, 32000, "float32", 3),
         _l("simpo", 2, 128, 256, 32000, "float32", 3)],
    gpu=[_l("dpo", 4, 1024, 4096, 128256, "bfloat16", 5, quick=True),
         _l("simpo", 4, 1024, 4096, 128256, "bfloat16", 5)],
)
LINEAR_IMPLS = (["eager"] + [f"ours_{b}" for b in C.OURS_BACKENDS[:-1]]
                + [f"composed_{b}" for b in C.OURS_BACKENDS[:-1]] + ["liger", "compile", "ours_reference"])
SHAPES = SHAPES + LINEAR_SHAPES  # one list, so _memory.py finds either kind by id


def _make_linear_inputs(shape: Shape) -> dict:
    b, t, h, v = (shape.dims[k] for k in ("B", "T", "H", "V"))
    g = C.generator(0)
    dt = shape.torch_dtype
    hidden = torch.randn(2 * b, t, h, generator=g, device=C.DEVICE).to(dt).requires_grad_()
    ref_hidden = torch.randn(2 * b, t, h, generator=g, device=C.DEVICE).to(dt)
    weight = (torch.randn(v, h, generator=g, device=C.DEVICE) * 0.02).to(dt).requires_grad_()
    ref_weight = weight.detach().clone()
    labels = torch.randint(0, v, (2 * b, t), generator=g, device=C.DEVICE)
    prompt = t // 4
    labels[:, :prompt] = -100  # prompt positions are not scored
    ends = torch.randint(t // 2, t + 1, (2 * b,), generator=g, device=C.DEVICE)
    labels[torch.arange(t, device=C.DEVICE)[None, :] >= ends[:, None]] = -100  # right padding
    return {"hidden": hidden, "ref_hidden": ref_hidden, "weight": weight, "ref_weight": ref_weight,
            "labels": labels}


def _eager_seq_logps(hidden, weight, labels):
    logits = hidden @ weight.T
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def eager_linear_step(hidden, weight, labels, ref_hidden, ref_weight, loss_type: str, beta: float):
    b = hidden.shape[0] // 2
    logps, lengths = _eager_seq_logps(hidden, weight, labels)
    pc, pr, cl, rl = logps[:b], logps[b:], lengths[:b], lengths[b:]
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (pc / cl - pr / rl - GAMMA / beta))
    else:
        with torch.no_grad():
            ref_logps, _ = _eager_seq_logps(ref_hidden, ref_weight, labels)
        rc, rr = ref_logps[:b], ref_logps[b:]
        losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    return losses.mean()


def build_linear(impl: str, shape: Shape, x: dict) -> C.Case:
    lt = shape.dims["loss"]
    beta = BETA[lt]
    hidden, weight, labels = x["hidden"], x["weight"], x["labels"]
    ref_hidden, ref_weight = x["ref_hidden"], x["ref_weight"]
    b = hidden.shape[0] // 2
    info = {"loss_type": lt, "beta": beta}
    if impl == "eager":
        fwd = lambda: eager_linear_step(hidden, weight, labels, ref_hidden, ref_weight, lt, beta)  # noqa: E731
    elif impl == "compile":
        fn = C.compiled(eager_linear_step)
        fwd = lambda: fn(hidden, weight, labels, ref_hidden, ref_weight, lt, beta)  # noqa: E731
    elif impl == "liger":
        cl = C.require_module("liger_kernel.chunked_loss", "liger-kernel")
        if lt == "dpo":
            loss = cl.LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True)
            fwd = lambda: loss(weight, hidden, labels, None, ref_hidden, ref_weight)[0]  # noqa: E731
        elif lt == "simpo":
            loss = cl.LigerFusedLinearSimPOLoss(beta=beta, gamma=GAMMA, compute_nll_loss=False)
            fwd = lambda: loss(weight, hidden, labels)[0]  # noqa: E731
        else:
            raise C.Unavailable(f"Liger-Kernel has no fused {lt} loss")
        info["note"] = "Liger computes the gradients inside its forward call (fwd includes them; bwd is a copy)"
    elif impl.startswith(("ours_", "composed_")):
        backend = impl.split("_")[1]
        C.require_ours(backend)
        import lpc_kernels as lk

        info["backend"] = backend

        def ref_logps():
            """The reference pass both take: ``(chosen [B], rejected [B])``, or ``(None, None)`` for SimPO."""
            if lt == "simpo":
                return None, None
            with torch.no_grad():
                return lk.sequence_logprobs(ref_hidden, ref_weight, labels, backend=backend)[0].chunk(2)

        options = dict(loss_type=lt, beta=beta, gamma=GAMMA if lt == "simpo" else 0.0, backend=backend)
        if impl.startswith("ours_"):
            info["note"] = "gradients computed inside the forward call (fwd includes them; bwd scales them)"

            def fwd():
                rc, rr = ref_logps()
                return lk.linear_preference_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                                 **options).loss
        else:
            def fwd():
                logps, lengths = lk.sequence_logprobs(hidden, weight, labels, backend=backend)
                return lk.preference_loss(logps[:b], logps[b:], *ref_logps(), chosen_lengths=lengths[:b],
                                          rejected_lengths=lengths[b:], **options).loss
    else:
        raise ValueError(impl)
    return C.Case(forward=fwd, backward=C.backward_scalar, params=[hidden, weight], info=info)


def build(impl: str, shape: Shape, x: dict) -> C.Case:
    return (build_linear if "T" in shape.dims else build_plain)(impl, shape, x)


@pytest.mark.parametrize("shape,impl,mode", C.params(SHAPES[:len(SHAPES) - len(LINEAR_SHAPES)], IMPLS))
def test_preference_loss(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode)


@pytest.mark.parametrize("shape,impl,mode", C.params(LINEAR_SHAPES, LINEAR_IMPLS))
def test_fused_linear_preference(benchmark, request, shape, impl, mode):
    C.run(benchmark, request, sys.modules[__name__], shape, impl, mode, op="fused_linear_preference")
