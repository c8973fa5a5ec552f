"""The eval and compare tests launch the trainer like tests/train does: reuse its helpers."""

import sys
from pathlib import Path

_TRAIN_TESTS = str(Path(__file__).resolve().parents[1] / "train")
if _TRAIN_TESTS not in sys.path:
    sys.path.insert(0, _TRAIN_TESTS)
