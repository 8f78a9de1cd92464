"""What the test files share: float64 oracles (``formulas``), checks every backend is held to
(``backend_checks``), opcheck and bad-call tables of the ops and raw kernels (``raw_op_cases``), training-run
readers (``runs``), the multi-process job runner (``spawned_jobs``), and the repository's paths."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
