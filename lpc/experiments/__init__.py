"""``python -m lpc.experiments``: studies of LPC on synthetic data with known ground truth.

* ``paper`` (``lpc.experiments.paper``): the paper's claims in miniature: DPO / SimPO / IPO with and without
  LPC, label noise, codebook-size and KL-weight sweeps, on four sources whose prompts hint at them; also on a
  real model and dataset (``--model`` / ``--dataset``).
* ``annotators`` (``lpc.experiments.annotators``): what the latent buys where it is the point: six annotators,
  nothing about them in the prompt; prompt-only and few-shot accuracy, leak controls, random-label controls.
* ``report DIR``: rebuild a study's ``report.md`` and plots from its results.

Each run is trained, reloaded and evaluated in a worker process (``lpc.experiments.runner``); a study resumes
where it stopped. Results and their reading: ``docs/results.md``.
"""

from .paper import FULL, QUICK, SECTIONS, conditions, noisy_real_dataset, prepare_real_dataset
from .runner import STUDIES, build_parser, main, plan, publish, run_dir, run_study, write_report

__all__ = ["FULL", "QUICK", "SECTIONS", "STUDIES", "build_parser", "conditions", "main", "noisy_real_dataset",
           "plan", "prepare_real_dataset", "publish", "run_dir", "run_study", "write_report"]
