"""``python -m lpc.experiments``: studies of LPC on synthetic data with known ground truth: ``paper`` (the paper's
claims in miniature, also on a real model and dataset) and ``annotators`` (what the latent buys where it is the
point); ``report DIR`` rebuilds a study's report. Each run is trained, reloaded and evaluated in a worker process
(``lpc.experiments.runner``); a study resumes where it stopped. Results and their reading: ``docs/results.md``."""

from .paper import FULL, QUICK, SECTIONS, conditions, noisy_real_dataset, prepare_real_dataset
from .runner import STUDIES, build_parser, main, plan, publish, run_dir, run_study, write_report

__all__ = ["FULL", "QUICK", "SECTIONS", "STUDIES", "build_parser", "conditions", "main", "noisy_real_dataset",
           "plan", "prepare_real_dataset", "publish", "run_dir", "run_study", "write_report"]
