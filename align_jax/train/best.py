"""The best evaluation of an offline run, and early stopping on it.

`train.keep_best` exports the parameters of the evaluation with the lowest eval loss instead of
the last ones (Hugging Face Trainer's `load_best_model_at_end` with `metric_for_best_model=
"eval_loss"`); `train.early_stopping_patience` = n ends the run once n evaluations in a row found
no lower eval loss (its `EarlyStoppingCallback`). Each member's directory holds `best/`, the model
of its best evaluation, written as soon as it is found, and `best.json`, that evaluation's step
and loss, so a resumed run goes on from the same best.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

from align_jax.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Best:
    """One member's lowest eval loss so far and the step it was measured at (-1: none yet)."""

    directory: Path
    step: int = -1
    loss: float = math.inf

    @classmethod
    def load(cls, directory: Path) -> Best:
        path = directory / "best.json"
        if not path.exists():
            return cls(directory)
        recorded = json.loads(path.read_text())
        return cls(directory, recorded["step"], recorded["loss"])

    def improves(self, step: int, loss: float) -> bool:
        """A lower loss at a later step (a resumed run that evaluates a step again keeps the best
        it recorded there)."""
        return loss < self.loss and step > self.step

    def record(self, step: int, loss: float, write: bool) -> None:
        self.step, self.loss = step, loss
        if write:
            (self.directory / "best.json").write_text(json.dumps({"step": step, "loss": loss}))


def check(t: TrainConfig, has_eval: bool) -> None:
    """Both settings need evaluations to compare: an eval split and `train.eval_every`."""
    for key, value in (("keep_best", t.keep_best),
                       ("early_stopping_patience", t.early_stopping_patience)):
        if value and not (has_eval and t.eval_every > 0):
            raise ConfigError(f"train.{key}={value} needs evaluations to compare: an eval split "
                              f"(data.eval or data.eval_fraction) and train.eval_every > 0")
    if t.early_stopping_patience < 0:
        raise ConfigError(f"train.early_stopping_patience={t.early_stopping_patience}: expected "
                          "a number of evaluations >= 0")


class Tracker:
    """The best evaluation of each member of a run (one, without a sweep)."""

    def __init__(self, t: TrainConfig, member_dirs: list[Path], resumed: bool, primary: bool):
        self.every, self.patience, self.primary = t.eval_every, t.early_stopping_patience, primary
        self.keep_best = t.keep_best
        self.bests = [Best.load(d) if resumed else Best(d) for d in member_dirs]

    def update(self, step: int, means: list[dict], export: Callable[[list[int], str], None]):
        """Record the members whose eval loss at `step` is their lowest; under `keep_best`,
        `export(members, "best")` writes their models first, so `best.json` never names a model
        that is not on disk."""
        better = [i for i, (b, m) in enumerate(zip(self.bests, means))
                  if b.improves(step, m["loss"])]
        if better and self.keep_best:
            export(better, "best")
        for i in better:
            self.bests[i].record(step, means[i]["loss"], self.primary)

    def stop(self, step: int) -> bool:
        """Whether every member has gone `patience` evaluations without a lower eval loss."""
        if not self.patience or not all(b.step >= 0 for b in self.bests):
            return False
        if all((step - b.step) // self.every >= self.patience for b in self.bests):
            log.info("early stopping at step %d: no lower eval loss in %d evaluations (best at "
                     "step %s)", step, self.patience, ", ".join(str(b.step) for b in self.bests))
            return True
        return False

    def keep(self) -> None:
        """Make each member's best model its exported `model/`."""
        if self.primary:
            for b in self.bests:
                shutil.copytree(b.directory / "best", b.directory / "model", dirs_exist_ok=True)
