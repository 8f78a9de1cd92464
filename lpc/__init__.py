"""LPC: Latent Preference Coding (Gong et al., ICML 2025, arXiv 2505.04993) on top of ``lpc_kernels``.

Modules, bottom to top (each imports only modules above it in this list):

* ``config`` (the settings as dataclasses: each field carries its CLI help), ``io`` (atomic writes);
* ``runtime`` (device, autocast, threads, quiet transformers), ``distributed`` (torchrun: process groups,
  DDP / FSDP2 wrapping, gathers, clipping, sharded state dicts);
* ``data`` (rows from files or ``datasets``, tokenised pairs and batches, the synthetic data and its tokenizer);
* ``model`` (HF causal LM + codebook + prior/posterior heads, z added before the LM head), ``losses``
  (DPO / IPO / SimPO + KL through ``lk.preference_loss``, step metrics), ``analysis`` (NMI, code usage,
  label noise, projections, per-pair inference), ``plots``;
* ``builders`` (data, policy, LoRA, reference model, optimizer of a run's config), ``checkpoint``
  (safetensors checkpoints, resume rules), ``reference`` (live / adapter-disabled / sharded / cached
  reference log-probs), ``cli`` (the generated ``lpc.train`` command line);
* ``evaluate`` (held-out evaluation, ``python -m lpc.evaluate``), ``train`` (the loop, ``python -m lpc.train``),
  ``generate`` (``python -m lpc.generate``), ``experiments`` (``python -m lpc.experiments``), ``tiny_model``
  (``python -m lpc.tiny_model``: tiny HF model directories for smoke tests).
"""

from .config import LPCConfig, SyntheticConfig, TrainConfig
from .model import LPCModel, LPCOutput, build_tiny_llama, make_reference, prior_mix_weight

__all__ = ["LPCConfig", "SyntheticConfig", "TrainConfig", "LPCModel", "LPCOutput", "build_tiny_llama",
           "make_reference", "prior_mix_weight"]
