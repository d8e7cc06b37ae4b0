"""train/best.py: each member's best evaluation, its export, and early stopping."""

import json

from align_jax.config import TrainConfig
from align_jax.train import best


def test_members_keep_their_own_best_and_stop_together(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    t = TrainConfig(eval_every=10, keep_best=True, early_stopping_patience=2)
    tracker, exported = best.Tracker(t, dirs, resumed=False, primary=True), []
    export = lambda members, name: exported.append((members, name))  # noqa: E731
    for step, losses in ((10, (3.0, 3.0)), (20, (2.0, 3.5)), (30, (2.5, 2.9)), (40, (2.1, 3.1))):
        tracker.update(step, [{"loss": x} for x in losses], export)
        assert not tracker.stop(step)
    assert exported == [([0, 1], "best"), ([0], "best"), ([1], "best")]
    assert [(b.step, b.loss) for b in tracker.bests] == [(20, 2.0), (30, 2.9)]
    assert not tracker.stop(40)  # b's best is one evaluation old
    assert tracker.stop(50)
    resumed = best.Tracker(t, dirs, resumed=True, primary=True)
    assert [(b.step, b.loss) for b in resumed.bests] == [(20, 2.0), (30, 2.9)]
    assert json.loads((dirs[1] / "best.json").read_text()) == {"step": 30, "loss": 2.9}
    resumed.update(30, [{"loss": 2.0}, {"loss": 2.9}], export)  # a step evaluated again
    assert len(exported) == 3


def test_patience_alone_exports_nothing_and_zero_never_stops(tmp_path):
    t = TrainConfig(eval_every=1, early_stopping_patience=1)
    tracker, exported = best.Tracker(t, [tmp_path], resumed=False, primary=True), []
    tracker.update(1, [{"loss": 1.0}], lambda m, n: exported.append(m))
    assert exported == [] and tracker.stop(2)
    never = best.Tracker(TrainConfig(eval_every=1, keep_best=True), [tmp_path], False, True)
    never.update(1, [{"loss": 1.0}], lambda m, n: None)
    assert not never.stop(100)
