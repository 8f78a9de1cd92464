"""What all ops share (lpc_kernels/__init__.py, backends.py, backend_interface.py, preference.py, nn.py): the backend
choice and its errors, the backend interface every backend implements (preference_loss's values by name), one
training step through all four ops under ``torch.compile(fullgraph=True)``, and the ``torch.nn`` wrappers."""

import inspect

import pytest
import torch

import lpc_kernels as lk
from lpc_kernels import backend_interface
from lpc_kernels.backends import BACKENDS, backend_module, unavailable_reason
from lpc_kernels.preference import PreferenceLossInputs, PreferenceLossOptions, PreferenceLossOutput
from tests.helpers.backend_checks import CPU, check_compiled_step_matches_eager, on_cuda
from tests.ops import test_gumbel_softmax_codes, test_linear_token_logprobs, test_preference_loss, test_token_logprobs

DEV = torch.device("cuda")


def logits():
    return torch.randn(3, 11)


def labels():
    return torch.tensor([0, 4, -100])


# ---------------------------------------------------------------------------------- backend choice
def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        lk.token_logprobs(logits(), labels(), backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        lk.token_logprobs(logits(), labels(), backend=3)


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cuda"):
        lk.token_logprobs(logits(), labels(), backend="cuda")  # CPU tensors on the cuda backend


def test_env_var_chooses_backend(monkeypatch):
    monkeypatch.setenv("LPC_KERNELS_BACKEND", "reference")
    assert lk.resolve_backend("auto", CPU) == "reference"
    monkeypatch.setenv("LPC_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LPC_KERNELS_BACKEND"):
        lk.resolve_backend("auto", CPU)
    assert lk.resolve_backend("reference", CPU) == "reference"  # an explicit argument wins


def test_auto_rule_on_cpu(monkeypatch):
    monkeypatch.delenv("LPC_KERNELS_BACKEND", raising=False)
    expected = "cpu" if "cpu" in lk.available_backends() else "reference"
    assert lk.resolve_backend("auto", CPU) == expected
    assert "reference" in lk.available_backends()


def test_at_least_fifteen_cases():
    cases = (test_token_logprobs.CASES + test_linear_token_logprobs.CASES + test_gumbel_softmax_codes.CASES
             + test_preference_loss.CASES)
    assert len(cases) >= 15


# --------------------------------------------------------------------------- the backend interface
def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_implements_the_interface(name):
    """Each backend module has every function of lpc_kernels.backend_interface, with the same parameters (names,
    kinds, defaults), so the op layer can call any of them the same way."""
    devices = [CPU] + ([DEV] if torch.cuda.is_available() else [])
    if all(unavailable_reason(name, d) is not None for d in devices):
        pytest.skip(f"backend {name!r} unavailable: {unavailable_reason(name, CPU)}")
    module = backend_module(name)
    for fn in backend_interface.FUNCTIONS:
        assert hasattr(module, fn), f"{module.__name__} lacks {fn}"
        assert _parameters(getattr(module, fn)) == _parameters(getattr(backend_interface, fn)), (name, fn)


def test_preference_loss_interface_passes_values_by_name(backend):
    """A backend's preference_loss_fwd returns ``PreferenceLossOutput``, its preference_loss_bwd the gradient of each
    input under the input's name (``PreferenceLossInputs``), None for the lengths and for absent inputs."""
    module = backend_module(backend)
    b = 3
    inputs = PreferenceLossInputs(torch.randn(b), torch.randn(b), chosen_lengths=torch.tensor([1, 2, 3]),
                                  rejected_lengths=torch.tensor([2.0, 2.0, 5.0]))
    options = PreferenceLossOptions(loss_type="simpo", beta=2, gamma=0.5).checked()
    assert type(options.beta) is float
    out = module.preference_loss_fwd(inputs, options)
    assert isinstance(out, PreferenceLossOutput) and out.loss.shape == () and out.kl.shape == (b,)
    grad_outputs = PreferenceLossOutput(torch.ones(()), *(torch.zeros(b) for _ in range(4)))
    grads = module.preference_loss_bwd(grad_outputs, inputs, options)
    assert isinstance(grads, PreferenceLossInputs)
    absent = ("ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "prior_logits",
              "posterior_logits")
    assert all(getattr(grads, name) is None for name in absent)
    # d mean(-logsigmoid(h)) / d lp_w with h = beta (lp_w / |y_w| - lp_l / |y_l|) - gamma
    h = 2 * (inputs.policy_chosen_logps / inputs.chosen_lengths
             - inputs.policy_rejected_logps / inputs.rejected_lengths) - 0.5
    torch.testing.assert_close(grads.policy_chosen_logps, -torch.sigmoid(-h) * 2 / inputs.chosen_lengths / b)


# ----------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph(backend):
    check_compiled_step_matches_eager(backend, CPU)


@on_cuda
def test_torch_compile_fullgraph_cuda():
    check_compiled_step_matches_eager("cuda", DEV)


# ----------------------------------------------------------------------------------------- modules
def test_nn_modules_match_functions():
    from lpc_kernels.nn import GumbelCodebook, LinearTokenLogprobs, PreferenceLoss

    book = GumbelCodebook(6, 4, tau=0.5, backend="reference")
    logits = torch.randn(3, 6)
    w, z = book(logits, seed=9)
    w2, z2 = lk.gumbel_softmax_codes(logits, book.codebook, tau=0.5, seed=9, backend="reference")
    assert torch.equal(w, w2) and torch.equal(z, z2)
    torch.testing.assert_close(book.expected(logits), torch.softmax(logits, -1) @ book.codebook)
    h, wt, lab = torch.randn(4, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, -100])
    torch.testing.assert_close(LinearTokenLogprobs(backend="reference")(h, wt, lab),
                               lk.linear_token_logprobs(h, wt, lab, backend="reference"))
    pc, pr, rc, rr = (torch.randn(3) for _ in range(4))
    out = PreferenceLoss(beta=0.2, backend="reference")(pc, pr, rc, rr)
    torch.testing.assert_close(out.loss, lk.preference_loss(pc, pr, rc, rr, beta=0.2, backend="reference").loss)


# ------------------------------------------------------------------------------------ value checks
def test_value_checks_deferred_to_the_next_read(backend, monkeypatch):
    """With the checks deferred (``LPC_KERNELS_SYNC_CHECKS=0``, the default for GPU tensors) a bad label or a NaN
    does not stop the op, no kernel reads outside the vocabulary (the row counts as ignored, forward and
    backward), and ``raise_pending_errors`` raises the message the op would have raised, once."""
    monkeypatch.setenv("LPC_KERNELS_SYNC_CHECKS", "0")
    x = torch.randn(3, 11, requires_grad=True)
    bad = torch.tensor([0, 11, -100])
    out = lk.token_logprobs(x, bad, backend=backend)
    out.sum().backward()
    assert out[1] == 0 and torch.isfinite(x.grad).all() and x.grad[1].abs().sum() == 0
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    lk.linear_token_logprobs(h, w, bad, backend=backend).sum().backward()
    lk.linear_token_logprobs(h, w.detach(), bad, backend=backend).sum().backward()  # frozen head
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\) or equal ignore_index=-100, got 11 \(found "
                                         r"on the device by an earlier op"):
        lk.raise_pending_errors()
    lk.raise_pending_errors()  # reported once
    pc = torch.tensor([0.0, float("nan")])
    lk.preference_loss(pc, pc.flip(0), pc, pc, backend=backend)
    with pytest.raises(ValueError, match="policy_chosen_logps contains NaN"):
        lk.raise_pending_errors()
    monkeypatch.setenv("LPC_KERNELS_SYNC_CHECKS", "1")  # raise inside the op
    with pytest.raises(ValueError, match="got 11") as info:
        lk.token_logprobs(x, bad, backend=backend)
    assert "earlier op" not in str(info.value)
