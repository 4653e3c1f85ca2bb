"""Task metrics: ROUGE-L and exact match of generated answers, multiple-choice accuracy.

  rouge_l          ROUGE-L F-measure of a prediction against a reference, by the `rouge-score`
                   package (its tokenizer: lowercase, non-alphanumerics dropped, Porter
                   stemming): LCS(p, r) = the longest common subsequence of the token lists,
                   P = LCS / |p|, R = LCS / |r|, F = 2PR / (P + R) (0 when either is empty).
  exact_match      1.0 when the answers are equal after `normalize_answer` (lowercase, punctuation
                   and the articles a / an / the dropped, whitespace collapsed), else 0.0.
  option_logliks   WinoGrande-style multiple choice: the summed log-probability of each option's
                   tokens after the prompt, under a `CausalLM`;
  mc_accuracy      the share of records whose most likely option is the answer.

Per-example scores are averaged per arm and seed by the caller (`jbat.experiment`).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=1)
def _scorer():
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F-measure (rouge-score's `rougeL`, Porter stemming) of one prediction."""
  return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
  """Lowercase, punctuation and articles dropped, whitespace collapsed (SQuAD-style)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in string.punctuation)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the normalised answers are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def answer_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """{"rouge_l": mean ROUGE-L F, "exact_match": mean exact match} over paired answers."""
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"need equally many predictions and references (>0), got "
                     f"{len(predictions)} and {len(references)}")
  return {"rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)])),
          "exact_match": float(np.mean([exact_match(p, r)
                                        for p, r in zip(predictions, references)]))}


def mc_predict(option_logliks: Sequence[Sequence[float]]) -> list[int]:
  """The index of the most likely option per record (the first on ties)."""
  return [int(np.argmax(np.asarray(ll, dtype=np.float64))) for ll in option_logliks]


def mc_accuracy(option_logliks: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
  """Share of records whose most likely option (`mc_predict`) is the answer index."""
  if len(option_logliks) != len(answers) or not answers:
    raise ValueError(f"need one answer per record (>0), got {len(option_logliks)} records and "
                     f"{len(answers)} answers")
  return float(np.mean([p == a for p, a in zip(mc_predict(option_logliks), answers)]))


def option_logliks(model, prompt: Sequence[int], options: Sequence[Sequence[int]],
                   pad_id: int = 0) -> list[float]:
  """Summed log-probability of each option's token ids after the prompt's, under `model` (a
  `jbat.models.causal_lm.CausalLM`, adapters included), one padded batch of prompt + option
  rows (right padding; causal attention, so padding after a row changes nothing)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rows = [list(prompt) + list(o) for o in options]
  if not prompt or any(not o for o in options):
    raise ValueError("option_logliks: need a non-empty prompt and non-empty options")
  width = max(map(len, rows))
  ids = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids)).astype(jnp.float32), axis=-1))
  out = []
  for i, o in enumerate(options):
    start = len(prompt)  # token t of the row is predicted at position t - 1
    out.append(float(sum(logp[i, start + j - 1, tok] for j, tok in enumerate(o))))
  return out
