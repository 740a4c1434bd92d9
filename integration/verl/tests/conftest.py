"""Tests of the verl drop-in against the real verl (pinned in integration/verl/requirements.txt).
Run by scripts/verl-tests.sh in its own virtual environment."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))  # verl_harness
sys.path.insert(0, str(REPO / "bindings" / "python" / "tests"))  # spec_reference (float64 reference)
sys.path.insert(0, str(REPO / "integration" / "verl"))  # the example
