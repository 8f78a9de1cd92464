"""LPC: Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993) on top of ``lpc_kernels``.

Modules: ``config`` (dataclasses), ``model`` (HF causal LM + codebook + prior/posterior heads, z added
before the LM head), ``losses`` (DPO / IPO / SimPO + KL through ``lk.preference_loss``), ``data``
(loading, tokenising, collation), ``synthetic`` (preference data with known ground truth),
``tokenizer`` (the locally trained synthetic tokenizer), ``evaluate`` (held-out accuracy), ``train``
(``python -m lpc.train``).
"""

from .config import LPCConfig, SyntheticConfig, TrainConfig
from .model import LPCModel, LPCOutput, build_tiny_llama, make_reference, prior_mix_weight

__all__ = ["LPCConfig", "SyntheticConfig", "TrainConfig", "LPCModel", "LPCOutput", "build_tiny_llama",
           "make_reference", "prior_mix_weight"]
