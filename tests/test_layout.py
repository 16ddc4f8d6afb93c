"""The package's import structure: no import circle among the training loops' shared modules."""

import subprocess
import sys
from pathlib import Path


def test_nonfinite_and_preflight_stand_without_the_loops_common_module():
    # each imported alone in a fresh interpreter: neither may pull in trainers.common (which imports both)
    for module in ("diffpo.trainers.nonfinite", "diffpo.trainers.preflight", "diffpo.trainers.checkpoints"):
        code = f"import sys, {module}; print('diffpo.trainers.common' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1]).stdout.strip()
        assert out == "False", module
