"""The metrics files across a resume: tensorboard drops what a killed run logged past its
checkpoint, and metrics.jsonl marks where the resumed run's records begin."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ultramem.train.metrics import MetricsLogger


def _log(tmp_path, start: int, steps: range) -> None:
    m = MetricsLogger(tmp_path, tmp_path / "tb", True, 10, progress=False)
    m.start(start)
    for step in steps:
        m.scalars(step, {"train/loss": float(start * 100 + step)})
    m.close()


def test_a_resumed_run_replaces_what_the_killed_one_logged_past_its_checkpoint(tmp_path):
    _log(tmp_path, 0, range(1, 6))  # a run killed at step 5, its checkpoint at step 3
    _log(tmp_path, 3, range(4, 7))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 304.0), (5, 305.0), (6, 306.0)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(1, 6)] + [("resume", 3)] + [
        ("train", s) for s in range(4, 7)
    ]


def test_a_fresh_run_in_the_same_directory_replaces_the_old_events(tmp_path):
    _log(tmp_path, 0, range(1, 6))
    _log(tmp_path, 0, range(1, 3))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
