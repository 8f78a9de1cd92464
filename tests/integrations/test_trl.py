"""``lpc_kernels.integrations.trl.patch_fused_lm_head``: TRL's own fused LM head
(``trl.kernels.ChunkedLogProbFunction``, ``add_fused_lm_head``) is the oracle for the patched one's log-probs,
optional fields and gradients."""

import sys

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lpc_kernels.integrations.trl import FIELDS, patch_fused_lm_head  # noqa: E402
from tests.helpers.backend_checks import CPU_BACKENDS, new_leaf  # noqa: E402

TRL_FUNCTION = trl_utils._ChunkedLogProbFunction


def _inputs(n=24, h=16, v=300, bias=True):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 4,
            torch.randn(v, generator=g) if bias else None, torch.randint(0, v, (n,), generator=g))


def _run(fn, hidden, weight, bias, targets, **kw):
    leaves = [new_leaf(t) if t is not None else None for t in (hidden, weight, bias)]
    out = fn.apply(*leaves, targets, kw.get("temperature", 1.0), 128, None, 1.0, FIELDS)
    out[0].sum().backward()
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patched_function_matches_trl(backend):
    x = _inputs()
    want, want_grads = _run(TRL_FUNCTION, *x)
    with patch_fused_lm_head(backend):
        got, got_grads = _run(trl_utils._ChunkedLogProbFunction, *x)
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION  # undone
    for name, a, b in zip(("log_probs",) + FIELDS, got, want):
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_forward_with_fused_lm_head_matches_trl():
    """``add_fused_lm_head`` on a tiny Llama: ``model(..., labels, fused_lm_head=True)`` gives the same log-probs,
    fields and parameter gradients with the patch as with TRL's function."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ids = torch.randint(0, 97, (3, 10))
    labels = ids.masked_fill(torch.arange(10) < 4, -100)
    results = []
    for patched in (False, True):
        model.zero_grad()
        with patch_fused_lm_head() if patched else torch.enable_grad():
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            out.log_probs.sum().backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, name).detach(), getattr(want, name).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.is_top1, want.is_top1)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_logit_transforms_fall_back_to_trl_with_a_warning():
    x = _inputs(bias=False)
    want, _ = _run(TRL_FUNCTION, *x, temperature=0.7)
    with patch_fused_lm_head(), pytest.warns(UserWarning, match="temperature=0.7"):
        got, _ = _run(trl_utils._ChunkedLogProbFunction, *x, temperature=0.7)
    torch.testing.assert_close(got[0], want[0])


def test_entropy_gradient_is_a_clear_error():
    hidden, weight, _, targets = _inputs(bias=False)
    with patch_fused_lm_head():
        out = trl_utils._ChunkedLogProbFunction.apply(new_leaf(hidden), weight, None, targets, 1.0, 128, None, 1.0,
                                                      FIELDS)
        with pytest.raises(RuntimeError, match="entropy of lpc_kernels' patched TRL fused LM head has no gradient"):
            out[1].sum().backward()


def test_missing_trl_and_bad_backend_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        patch_fused_lm_head("tpu")
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    with pytest.raises(ImportError, match=r"lpc-kernels\[trl\]"):
        patch_fused_lm_head()
