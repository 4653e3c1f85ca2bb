"""The names jbat knows, registered once: scores, selection rules, arms, and their settings.

Every other module reads these tuples and helpers instead of spelling the names again: the
config validates with them, `scoring.stream` picks kernels by them, `selection` checks its rule
and default threshold with them, the experiment maps an arm to its score with `score_for`.
This module imports nothing from jbat but `errors`, so it sits below every stage.

Scores (every score is "higher = select first"; `scoring/stream.py` defines each one):
  align, loss_diff, cosine, surrogate_fit, surrogate_grad, less_1ckpt, rel_loss_diff (need the
  surrogate), less (LESS as its authors run it: its own warm-up from the surrogate's phi0 on
  5% of the pool), contrast, contrast_align (also the control surrogate), dsir, random (no
  model).
Rules (`selection.py`): topk, threshold_uniform, threshold_proportional, cluster, round_robin;
cluster and round_robin also need projected-gradient features of the candidates.
Arms: none, random, oracle, albat (the configured score), or any score name.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jbat.errors import JbatError

SCORES = ("align", "loss_diff", "cosine", "surrogate_fit", "surrogate_grad", "less", "dsir",
          "random", "rel_loss_diff", "contrast", "contrast_align", "less_1ckpt")
MODEL_SCORES = ("align", "loss_diff", "cosine", "surrogate_fit", "surrogate_grad", "less",
                "rel_loss_diff", "contrast", "contrast_align", "less_1ckpt")
CONTROL_SCORES = ("contrast", "contrast_align")  # Need the control surrogate's phi_c.
# Scores whose default threshold is the sign condition (tau = 0): the first-order ones.
SIGN_SCORES = ("align", "loss_diff", "rel_loss_diff", "contrast", "contrast_align")
RULES = ("topk", "threshold_uniform", "threshold_proportional", "cluster", "round_robin")
FEATURE_RULES = ("cluster", "round_robin")  # Need gradient features of the candidates.
BASE_ARMS = ("none", "random", "oracle", "albat")  # Besides these, any score name is an arm.
SELECTING_ARMS = ("albat",)  # Base arms whose documents come from a scored selection.
# Peers run as their authors run them: one selection before training, never re-selected
# around the adapter (as arms; albat with select.score = "less" still re-selects).
PEER_ARMS = ("less", "dsir")


def check_choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
  """`value` if it is one of `allowed`, else JbatError naming `where` and the choices."""
  if value not in allowed:
    raise JbatError(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
  return value


def check_score(name: Any, where: str = "select.score") -> str:
  return check_choice(name, SCORES, where)


def check_rule(name: Any, where: str = "select.rule") -> str:
  return check_choice(name, RULES, where)


def score_for(arm: str, config: Any) -> str | None:
  """The score an arm selects by: select.score for "albat", the arm itself for a score name,
  None for arms without a scored selection (none, random, oracle: the base arm "random" is a
  uniform draw, not the score of that name)."""
  if arm in SELECTING_ARMS:
    return config.select.score
  return arm if arm in SCORES and arm not in BASE_ARMS else None


def reselects(score: str | None) -> bool:
  """Whether re-selection around the current adapter means anything for this score (it
  depends on a surrogate adapter; dsir and random do not)."""
  return score in MODEL_SCORES


def arm_reselects(arm: str, config: Any) -> bool:
  """Whether `arm` re-selects around its adapter when bat.reselect_every > 0: arms whose
  score depends on an adapter, except the peers (`PEER_ARMS`), which select once."""
  return arm not in PEER_ARMS and reselects(score_for(arm, config))


def parse_tau(text: Any) -> float | None | str:
  """select.tau: "default" (the sign condition where it applies), "none" (None), or a number.

  Raises JbatError naming select.tau for anything else."""
  text = str(text).strip()
  if text in ("default", "none"):
    return None if text == "none" else text
  try:
    tau = float(text)
  except ValueError:
    tau = float("nan")
  if not np.isfinite(tau):
    raise JbatError(f"config: select.tau must be 'default', 'none' or a finite number; "
                    f"got {text!r}")
  return tau


def default_tau(score: str) -> float | None:
  """0.0 (sign condition) for SIGN_SCORES, None (no threshold) for every other score."""
  return 0.0 if score in SIGN_SCORES else None


def resolve_tau(tau: float | None | str, score: str) -> float | None:
  """A threshold as selection applies it: "default" -> default_tau(score); a number or None
  as is; JbatError for any other string."""
  if isinstance(tau, str) and tau == "default":
    return default_tau(score)
  if isinstance(tau, str):
    raise JbatError(f"selection.tau: expected a number, None or 'default', got {tau!r}")
  return tau


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def resolve_k(k: int | str, n_adapt: int) -> int:
  """k as an absolute count: an int > 0, or a string "<m>x" meaning round(m * |D_A|).

  Examples: resolve_k(100, 20) = 100, resolve_k("4x", 20) = 80, resolve_k("0.5x", 20) = 10.
  """
  if _is_int(k):
    if k <= 0:
      raise JbatError(f"selection.k: expected a positive count, got {k}")
    return int(k)
  if isinstance(k, str):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*x\s*", k)
    if m:
      value = int(round(float(m.group(1)) * n_adapt))
      if value <= 0:
        raise JbatError(f"selection.k: {k!r} times |D_A| = {n_adapt} gives {value} examples")
      return value
  raise JbatError(f"selection.k: expected a positive int or a multiple of |D_A| like '4x', "
                  f"got {k!r}")


def check_k(k: Any, n_pool: int) -> int:
  """k itself when it is a positive int no larger than the pool, else JbatError."""
  if not _is_int(k) or k <= 0:
    raise JbatError(f"selection.k: expected a positive int (see resolve_k), got {k!r}")
  if k > n_pool:
    raise JbatError(f"selection.k: k = {k} is larger than the backbone pool ({n_pool} examples)")
  return int(k)


def pool_k(k: int, n_pool: int) -> int:
  """select.k as a run uses it: at most the pool size (a small pool gives all of it)."""
  return min(int(k), int(n_pool))
