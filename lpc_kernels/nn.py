"""``torch.nn`` wrappers of the ops, for code that composes modules."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import PreferenceLossOutput, gumbel_softmax_codes, linear_token_logprobs, preference_loss


class LinearTokenLogprobs(nn.Module):
    """Log-probs of ``labels`` under an LM head ``(weight [V, H], bias [V]?)`` without ``[N, V]`` logits."""

    def __init__(self, ignore_index: int = -100, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        self.ignore_index, self.backend, self.chunk_size = ignore_index, backend, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                     backend=self.backend, chunk_size=self.chunk_size)


class GumbelCodebook(nn.Module):
    """A codebook ``E [K, D]`` and its Gumbel-softmax sampler: ``forward(logits [B, K]) -> (weights, z [B, D])``.

    ``seed``/``offset`` are passed per call (the trainer keeps one seed per run and gives each example its own
    counters: ``lpc.model.LPCModel.gumbel_offsets``).
    """

    def __init__(self, num_codes: int, dim: int, tau: float = 1.0, hard: bool = False, backend: str = "auto",
                 init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_codes, dim, device=device, dtype=dtype) * init_std)
        self.tau, self.hard, self.backend = tau, hard, backend

    def forward(self, logits: Tensor, seed: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        return gumbel_softmax_codes(logits, self.codebook, tau=self.tau, hard=self.hard, seed=seed, offset=offset,
                                    backend=self.backend)

    def expected(self, logits: Tensor) -> Tensor:
        """``softmax(logits) @ E``: the deterministic latent used at inference."""
        return torch.softmax(logits.float(), dim=-1).to(self.codebook.dtype) @ self.codebook


class PreferenceLoss(nn.Module):
    """DPO / IPO / SimPO + ``kl_weight * KL(q || p)`` with fixed hyper-parameters (see ``preference_loss``)."""

    def __init__(self, loss_type: str = "dpo", beta: float = 0.1, gamma: float = 0.0, label_smoothing: float = 0.0,
                 kl_weight: float = 0.0, ipo_average: bool = True, backend: str = "auto"):
        super().__init__()
        self.options = dict(loss_type=loss_type, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
                            kl_weight=kl_weight, ipo_average=ipo_average, backend=backend)

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
                **tensors: Optional[Tensor]) -> PreferenceLossOutput:
        return preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               **tensors, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
