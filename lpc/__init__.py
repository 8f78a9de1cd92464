"""LPC: Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993) on top of ``lpc_kernels``.

Modules: ``config`` (dataclasses), ``model`` (HF causal LM + codebook + prior/posterior heads, z added
before the LM head), ``losses`` (DPO / IPO / SimPO + KL through ``lk.preference_loss``), ``data``
(loading JSONL/JSON/Parquet/``datasets``, validation, tokenising, collation, resumable order),
``synthetic`` (preference data with known ground truth), ``tokenizer`` (the locally trained synthetic
tokenizer), ``reference`` (live / adapter-disabled / cached reference log-probs), ``checkpoint``
(safetensors checkpoints and resume), ``evaluate`` (held-out evaluation, ``python -m lpc.evaluate``),
``generate`` (``python -m lpc.generate``), ``tiny_model`` (tiny HF model directories for smoke tests),
``io`` (atomic writes), ``cli`` (the shared help formatter), ``train`` (``python -m lpc.train``),
``distributed`` (torchrun: DDP / FSDP2, rank slices, metric reduction), ``analysis`` (NMI, code usage,
projections, plots), ``experiments`` (``python -m lpc.experiments``: the paper-claims study).
"""

from .config import LPCConfig, SyntheticConfig, TrainConfig
from .model import LPCModel, LPCOutput, build_tiny_llama, make_reference, prior_mix_weight

__all__ = ["LPCConfig", "SyntheticConfig", "TrainConfig", "LPCModel", "LPCOutput", "build_tiny_llama",
           "make_reference", "prior_mix_weight"]
