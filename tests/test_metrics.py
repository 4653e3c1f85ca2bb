"""Task metrics: ROUGE-L against a hand-computed LCS, exact match's normalisation, multiple
choice by option log-likelihood against a brute-force per-token computation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("rouge_score", reason="rouge-score not installed (requirements.lock)")

from jbat import metrics  # noqa: E402
from jbat.models.causal_lm import CausalLM, LMConfig  # noqa: E402


def test_rouge_l_hand_computed_lcs():
  # reference: "the cat sat on the mat" (6 tokens); prediction: "the cat lay on a mat" (6).
  # LCS = "the cat on mat" = 4 tokens: P = R = 4/6, F = 4/6.
  assert metrics.rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(4 / 6)
  # Unequal lengths: reference 4 tokens, prediction 2 of them in order -> P = 1, R = 1/2,
  # F = 2 * 1 * 0.5 / 1.5 = 2/3.
  assert metrics.rouge_l("alpha delta", "alpha beta gamma delta") == pytest.approx(2 / 3)
  # Order matters (subsequence, not bag of words): LCS of "b a" and "a b" is 1.
  assert metrics.rouge_l("beta alpha", "alpha beta") == pytest.approx(0.5)
  assert metrics.rouge_l("same words here", "Same, words here!") == pytest.approx(1.0)
  assert metrics.rouge_l("", "something") == 0.0


def _lcs(a, b):
  """Brute force: the longest common subsequence by trying every subsequence of a."""
  for n in range(len(a), 0, -1):
    for idx in itertools.combinations(range(len(a)), n):
      sub = [a[i] for i in idx]
      it = iter(b)
      if all(any(x == y for y in it) for x in sub):
        return n
  return 0


def test_rouge_l_matches_brute_force_lcs():
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "omega"]
  for _ in range(20):
    p = list(rng.choice(words, size=rng.integers(1, 7)))
    r = list(rng.choice(words, size=rng.integers(1, 7)))
    lcs = _lcs(p, r)
    f = 0.0 if lcs == 0 else 2 * (lcs / len(p)) * (lcs / len(r)) / (lcs / len(p) + lcs / len(r))
    assert metrics.rouge_l(" ".join(p), " ".join(r)) == pytest.approx(f)


def test_exact_match_normalises():
  assert metrics.exact_match("The  Answer!", "answer") == 1.0
  assert metrics.exact_match("an apple, a day", "Apple day") == 1.0
  assert metrics.exact_match("apples", "apple") == 0.0
  s = metrics.answer_scores(["x y", "The z."], ["x y", "q"])
  assert s["exact_match"] == 0.5
  assert s["rouge_l"] == pytest.approx(0.5)
  with pytest.raises(ValueError):
    metrics.answer_scores(["a"], ["a", "b"])


def test_mc_accuracy():
  assert metrics.mc_predict([[-1.0, -0.5], [-2.0, -3.0], [-1.0, -1.0]]) == [1, 0, 0]
  assert metrics.mc_accuracy([[-1.0, -0.5], [-2.0, -3.0], [-1.0, -1.0]], [1, 1, 0]) == 2 / 3
  with pytest.raises(ValueError):
    metrics.mc_accuracy([[0.0, 1.0]], [])


def test_option_logliks_match_brute_force():
  """Each option's summed log-probability equals the product of the model's next-token
  probabilities computed one prefix at a time (no padding, no batching)."""
  cfg = LMConfig(vocab_size=23, max_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                 pos="rope", norm="rmsnorm", mlp="swiglu")
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  prompt, options = [1, 5, 7], [[3], [4, 9, 2], [11, 11]]
  got = metrics.option_logliks(model, prompt, options)
  for o, ll in zip(options, got):
    want, seq = 0.0, list(prompt)
    for tok in o:
      logits = model(jnp.asarray([seq], jnp.int32))[0, -1]
      want += float(jax.nn.log_softmax(logits)[tok])
      seq.append(tok)
    assert ll == pytest.approx(want, abs=1e-4)
  answer = int(np.argmax(got))
  assert metrics.mc_accuracy([got], [answer]) == 1.0
