"""LPC: Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993) on top of ``lpc_kernels``: the model,
its trainer (``python -m lpc.train``), evaluation, generation, the studies and the TRL integration. Its modules,
bottom to top: README.md, "Layout" (the order ``tests/trainer/test_layout.py`` checks)."""

from .config import LPCConfig, SyntheticConfig, TrainConfig
from .hf import build_tiny_llama
from .model import LPCModel, LPCOutput, prior_mix_weight
from .objective import make_reference

__all__ = ["LPCConfig", "SyntheticConfig", "TrainConfig", "LPCModel", "LPCOutput", "build_tiny_llama",
           "make_reference", "prior_mix_weight"]
