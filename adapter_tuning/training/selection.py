"""Model selection during a run: the best-on-validation artifact and early stopping.

With `eval_every_steps` set, every evaluation scores the task's main metric (the first of
its metric names: accuracy, pearson, matthews_corr, ... are maximised; masked-LM perplexity
and losses are minimised, `metrics.lower_is_better`).
A new best writes `adapter_best/` beside the last-step `adapter/`, so a fair comparison can
take each method at its best step, as the paper's model selection does; with
`early_stopping_patience = N`, N evaluations in a row without a new best end training (a
checkpoint, then the usual final evaluation and artifact). The tracker's state travels in
each checkpoint's metadata, so a resumed run keeps its best and its patience count.
"""

from __future__ import annotations

import dataclasses
import math

from adapter_tuning.data.metrics import lower_is_better

BEST_DIR = 'adapter_best'


@dataclasses.dataclass
class BestTracker:
  metric: str  # e.g. 'eval/accuracy'
  patience: int  # 0 = never stop early
  score: float | None = None
  step: int | None = None
  bad_evals: int = 0

  def update(self, metrics: dict, step: int) -> bool:
    """Records one evaluation; True when it is a new best."""
    value = metrics.get(self.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      self.bad_evals += 1
      return False
    minimise = lower_is_better(self.metric)
    if self.score is None or (value < self.score if minimise else value > self.score):
      self.score, self.step, self.bad_evals = float(value), step, 0
      return True
    self.bad_evals += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_evals >= self.patience

  def state(self) -> dict:
    return {'metric': self.metric, 'score': self.score, 'step': self.step,
            'bad_evals': self.bad_evals}

  def restore(self, state: dict | None):
    if state and state.get('metric') == self.metric:
      self.score, self.step, self.bad_evals = state['score'], state['step'], state['bad_evals']
