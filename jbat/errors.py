"""User-facing errors. Anything raised as `JbatError` is printed without a traceback and exits 2."""

from __future__ import annotations


class JbatError(Exception):
  """A problem with the user's input (config, files, data): the message says what and where."""

  exit_code = 2


class Diverged(JbatError):
  """A training run produced a non-finite loss, gradient norm or held-out loss.

  Raised by `jbat.training.loop.fit` at the first check after the first bad step, before any
  non-finite value is checkpointed, evaluated as "best" or logged: the run's folder keeps its
  last finite checkpoint. Callers that know more (which arm and seed, which config key holds the
  learning rate) re-raise `within(...)` so the message names them.

  Attributes:
    step: the first training step whose loss or gradient norm was not finite (for a non-finite
      held-out loss: the step evaluated).
    what: "loss or gradient norm" or "held-out loss".
    stage: what was being trained (fit's `desc`, e.g. "surrogate").
    lr: the peak learning rate of that run.
    context: who ran it ("arm random seed 0"), added by `within`.
    seed: the training seed of that run, when the caller knows it.
    lr_key: the config key of the learning rate ("train.lr"), added by `within`.
  """

  def __init__(self, step: int, what: str, stage: str, lr: float, context: str = "",
               lr_key: str = "", seed: int | None = None):
    self.step, self.what, self.stage, self.lr = step, what, stage, lr
    self.context, self.lr_key, self.seed = context, lr_key, seed
    super().__init__(self.message())

  def short(self) -> str:
    """Who diverged, where: "arm random seed 0: adapter training diverged at step 4 (...)"."""
    where = f"{self.context}: " if self.context else ""
    return f"{where}{self.stage} diverged at step {self.step} (non-finite {self.what})"

  def hint(self) -> str:
    lr = f"{self.lr_key}={self.lr:g}" if self.lr_key else f"the learning rate {self.lr:g}"
    return (f"likely cause: {lr} is too high; the last finite checkpoint is kept; lower the "
            f"learning rate (in a new workdir) and run again")

  def message(self) -> str:
    return f"{self.short()}; {self.hint()}"

  def within(self, context: str, lr_key: str = "", seed: int | None = None,
             stage: str = "") -> Diverged:
    """The same divergence, its message naming `context`, the learning-rate key and (if given)
    a clearer `stage` name."""
    return Diverged(self.step, self.what, stage or self.stage, self.lr, context=context,
                    lr_key=lr_key or self.lr_key, seed=self.seed if seed is None else seed)
