"""The named values of ``preference_loss`` that the op layer hands to every backend: the loss options (with their
checks), the eight inputs and the five outputs. Gradients travel in the same shapes: the gradient of each output
under the output's name (``PreferenceLossOutput``), of each input under the input's name (``PreferenceLossInputs``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from torch import Tensor

from .checks import check_bool, check_float

LOSS_TYPES = ("dpo", "ipo", "simpo")


class PreferenceLossOptions(NamedTuple):
    """The loss settings of ``preference_loss`` and ``linear_preference_loss`` (their docstrings say what each
    means). The custom ops take the fields as primitives, in this order."""

    loss_type: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.0
    label_smoothing: float = 0.0
    kl_weight: float = 0.0
    ipo_average: bool = True

    def checked(self) -> PreferenceLossOptions:
        """These options with the numbers as floats; raises ``ValueError`` / ``TypeError`` naming a bad one."""
        if not isinstance(self.loss_type, str) or self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        beta = check_float("beta", self.beta, positive=True)
        gamma = check_float("gamma", self.gamma)
        if self.loss_type != "simpo" and gamma != 0.0:
            raise ValueError(f"gamma (the SimPO margin) must be 0 for loss_type={self.loss_type!r}, got {gamma}")
        label_smoothing = check_float("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        if self.loss_type == "ipo" and label_smoothing != 0.0:
            raise ValueError(f"label_smoothing must be 0 for loss_type='ipo', got {label_smoothing}")
        kl_weight = check_float("kl_weight", self.kl_weight, low=0.0)
        check_bool("ipo_average", self.ipo_average)
        return PreferenceLossOptions(self.loss_type, beta, gamma, label_smoothing, kl_weight, self.ipo_average)

    @property
    def needs_lengths(self) -> bool:
        """Whether the pair terms divide by the answers' lengths (simpo, and ipo with ``ipo_average``)."""
        return self.loss_type == "simpo" or (self.loss_type == "ipo" and self.ipo_average)


class PreferenceLossInputs(NamedTuple):
    """Summed log-probs ``[B]`` of the policy and the reference, answer lengths ``[B]`` and the code logits
    ``[B, K]`` (``None``: absent). A backend's backward returns the input gradients in this shape (``None`` for
    the lengths and for absent inputs)."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Optional[Tensor] = None
    ref_rejected_logps: Optional[Tensor] = None
    chosen_lengths: Optional[Tensor] = None
    rejected_lengths: Optional[Tensor] = None
    prior_logits: Optional[Tensor] = None
    posterior_logits: Optional[Tensor] = None


class PreferenceLossOutput(NamedTuple):
    """``loss`` scalar = mean of ``losses [B]`` (pair loss + kl_weight * kl); rewards and ``kl`` are ``[B]``."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    kl: Tensor


# The inputs that get a gradient, in the order the backward kernels and ops return theirs (csrc/ops.cpp)
DIFFERENTIABLE_INPUTS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                         "prior_logits", "posterior_logits")


def pack_input_grads(grads: PreferenceLossInputs, placeholder: Callable[[], Tensor]) -> tuple:
    """The gradients of ``DIFFERENTIABLE_INPUTS`` as a backward op returns them: ``placeholder()`` (a fresh ``[0]``
    tensor: outputs may not alias) for each ``None``."""
    return tuple(g if g is not None else placeholder() for g in (getattr(grads, n) for n in DIFFERENTIABLE_INPUTS))


def unpack_input_grads(packed, inputs: PreferenceLossInputs) -> PreferenceLossInputs:
    """``PreferenceLossInputs`` of the gradients ``packed`` by ``pack_input_grads`` (or a backward kernel): ``None``
    for the lengths and for the inputs absent from ``inputs``."""
    named = dict(zip(DIFFERENTIABLE_INPUTS, packed))
    return PreferenceLossInputs(**{name: named[name] if name in named and getattr(inputs, name) is not None else None
                                   for name in PreferenceLossInputs._fields})
