"""Scoring kernels vs brute force on a tiny bigram "LM" with a LoRA-like adapter {"a", "b"}."""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbat.errors import JbatError
from jbat.scoring import dsir
from jbat.scoring import kernels as K

V, D, R, T = 11, 6, 3, 7  # vocab, width, adapter rank, sequence length


def _base():
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (V, D)), jax.random.normal(k2, (D, V)) / np.sqrt(D))


EMB, OUT = _base()


def loss_fn(adapter, batch, guard=True):
  """Per-example mean next-token NLL over masked targets: f32[B]."""
  x = EMB[batch["tokens"][:, :-1]]                         # [B, T-1, D]
  h = jnp.tanh(x + (x @ adapter["a"]) @ adapter["b"])
  logp = jax.nn.log_softmax(h @ OUT, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  m = batch["mask"][:, 1:]
  count = jnp.maximum(m.sum(-1), 1.0) if guard else m.sum(-1)
  return (nll * m).sum(-1) / count


# An unguarded loss: padding rows with an all-zero mask give 0/0 = NaN loss and NaN gradients.
nan_loss_fn = functools.partial(loss_fn, guard=False)


def make_adapter(seed, scale=0.3):
  ka, kb = jax.random.split(jax.random.key(seed))
  return {"a": scale * jax.random.normal(ka, (D, R)), "b": scale * jax.random.normal(kb, (R, D))}


def make_batch(seed, b, valid=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, T + 1, size=b)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return {"tokens": jnp.asarray(rng.integers(0, V, size=(b, T)), jnp.int32),
          "mask": jnp.asarray(mask),
          "valid": jnp.full((b,), valid)}


def pad(batch, n, seed=99, zero_mask=False):
  """Append n invalid garbage rows."""
  g = make_batch(seed, n, valid=False)
  if zero_mask:
    g["mask"] = jnp.zeros_like(g["mask"])
  return {k: jnp.concatenate([batch[k], g[k]]) for k in batch}


def flat(tree):
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def brute_grads(fn, phi, batch):
  """Per-example gradients, one example at a time in a Python loop: float64 [B, |phi|]."""
  grad = _row_grad(fn)
  out = []
  for i in range(batch["valid"].shape[0]):
    row = {k: v[i:i + 1] for k, v in batch.items()}
    out.append(flat(grad(phi, row)).astype(np.float64))
  return np.stack(out)


@functools.cache
def _row_grad(fn):
  return jax.jit(jax.grad(lambda p, row: fn(p, row)[0]))


@functools.cache
def J(kernel, fn=loss_fn, **static):
  """The jitted kernel with the loss bound (compiled once per shape; eager op-by-op is slow)."""
  return K.jit_kernel(kernel, fn, **static)


PHI0, PHIS = make_adapter(1), make_adapter(2)
DELTA = K.tree_sub(PHIS, PHI0)
BATCH = make_batch(3, 5)
B = 5


def test_tree_helpers():
  a, b = make_adapter(5), make_adapter(6)
  np.testing.assert_allclose(K.tree_dot(a, b), flat(a) @ flat(b), rtol=1e-5)
  np.testing.assert_allclose(K.tree_norm(a), np.linalg.norm(flat(a)), rtol=1e-5)
  np.testing.assert_allclose(flat(K.tree_sub(a, b)), flat(a) - flat(b))


def test_align_matches_brute_force():
  g = brute_grads(loss_fn, PHI0, BATCH)
  want = -g @ flat(DELTA).astype(np.float64)
  got = np.asarray(J(K.align)(PHI0, DELTA, BATCH))
  assert got.dtype == np.float32 and got.shape == (B,)
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


def test_loss_diff_matches_two_forwards():
  want = np.asarray(loss_fn(PHI0, BATCH)) - np.asarray(loss_fn(PHIS, BATCH))
  np.testing.assert_allclose(J(K.loss_diff)(PHI0, PHIS, BATCH), want, rtol=1e-6, atol=1e-7)


def test_rel_loss_diff_matches_two_forwards_and_guards_nonpositive_l0():
  l0, ls = np.asarray(loss_fn(PHI0, BATCH)), np.asarray(loss_fn(PHIS, BATCH))
  np.testing.assert_allclose(J(K.rel_loss_diff)(PHI0, PHIS, BATCH), (l0 - ls) / l0,
                             rtol=1e-5, atol=1e-7)
  got = K.relative_diff(jnp.array([2.0, 0.0, -1.0, 4.0]), jnp.array([1.0, 1.0, 1.0, 1.0]),
                        jnp.array([True, True, True, False]))
  np.testing.assert_array_equal(np.asarray(got), [0.5, 0.0, 0.0, 0.0])


def test_per_example_grads_and_grad_norm():
  g = brute_grads(loss_fn, PHI0, BATCH)
  pg = J(K.per_example_grads)(PHI0, BATCH)
  assert pg["a"].shape == (B, D, R) and pg["b"].shape == (B, R, D)
  got = np.concatenate([np.asarray(x).reshape(B, -1) for x in jax.tree.leaves(pg)], axis=1)
  np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(J(K.grad_norm)(PHI0, BATCH), np.linalg.norm(g, axis=1),
                             rtol=1e-5)


def test_cosine_matches_numpy():
  g = brute_grads(loss_fn, PHI0, BATCH)
  d = flat(DELTA).astype(np.float64)
  want = -(g @ d) / (np.linalg.norm(g, axis=1) * np.linalg.norm(d))
  np.testing.assert_allclose(J(K.cosine)(PHI0, DELTA, BATCH), want, rtol=1e-5, atol=1e-6)
  # A zero delta has no direction: score 0, not NaN.
  zero = jax.tree.map(jnp.zeros_like, DELTA)
  np.testing.assert_array_equal(J(K.cosine)(PHI0, zero, BATCH), np.zeros(B, np.float32))


def test_surrogate_fit():
  g = brute_grads(loss_fn, PHIS, BATCH)
  out = J(K.surrogate_fit)(PHIS, BATCH)
  assert set(out) == {"neg_loss", "neg_grad_norm"}
  np.testing.assert_allclose(out["neg_loss"], -np.asarray(loss_fn(PHIS, BATCH)), rtol=1e-6)
  np.testing.assert_allclose(out["neg_grad_norm"], -np.linalg.norm(g, axis=1), rtol=1e-5)


def test_mean_grad_and_grad_sum_over_batches():
  b1, b2 = make_batch(7, 3), pad(make_batch(8, 2), 3)
  g = np.concatenate([brute_grads(loss_fn, PHIS, b1), brute_grads(loss_fn, PHIS, make_batch(8, 2))])
  want = g.mean(0)
  s1, c1 = J(K.grad_sum)(PHIS, b1)
  s2, c2 = J(K.grad_sum)(PHIS, b2)
  assert float(c1) == 3 and float(c2) == 2
  got = K.finish_mean(jax.tree.map(jnp.add, s1, s2), c1 + c2)
  np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(flat(J(K.mean_grad)(PHIS, b1)), g[:3].mean(0), rtol=1e-5,
                             atol=1e-7)


@functools.partial(jax.jit, static_argnums=0)
def _all_scores(fn, batch, key):
  tg = J(K.mean_grad, fn)(PHIS, make_batch(11, 4))
  sf = J(K.surrogate_fit, fn)(PHIS, batch)
  return {
      "align": J(K.align, fn)(PHI0, DELTA, batch),
      "loss_diff": J(K.loss_diff, fn)(PHI0, PHIS, batch),
      "cosine": J(K.cosine, fn)(PHI0, DELTA, batch),
      "grad_norm": J(K.grad_norm, fn)(PHI0, batch),
      "neg_loss": sf["neg_loss"],
      "neg_grad_norm": sf["neg_grad_norm"],
      "less": J(K.less, fn)(PHIS, tg, batch),
      "less_proj": J(K.less, fn, proj_dim=16)(PHIS, K.project_target(tg, key, 16), batch,
                                               key=key),
      "random": K.random_scores(key, jnp.arange(batch["valid"].shape[0]), batch["valid"]),
  }


@pytest.mark.parametrize("zero_mask", [False, True])
def test_padding_rows_do_not_change_valid_scores(zero_mask):
  fn = nan_loss_fn if zero_mask else loss_fn
  key = jax.random.key(4)
  ref = _all_scores(fn, BATCH, key)
  padded = _all_scores(fn, pad(BATCH, 4, zero_mask=zero_mask), key)
  for name in ref:
    assert np.all(np.isfinite(ref[name])), name
    np.testing.assert_allclose(padded[name][:B], ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(padded[name][B:], np.zeros(4, np.float32), err_msg=name)


def test_padding_mean_grad_ignores_nan_rows():
  want = J(K.mean_grad)(PHIS, BATCH)
  got = J(K.mean_grad, nan_loss_fn)(PHIS, pad(BATCH, 3, zero_mask=True))
  np.testing.assert_allclose(flat(got), flat(want), rtol=1e-6, atol=1e-7)


def test_delta_structure_errors_name_the_leaf():
  bad_shape = {"a": DELTA["a"], "b": jnp.zeros((R, D + 1))}
  with pytest.raises(JbatError, match=r"\['b'\].*\(3, 7\).*\(3, 6\)"):
    K.align(loss_fn, PHI0, bad_shape, BATCH)
  with pytest.raises(JbatError, match=r"missing in delta: \[\"\['b'\]\"\]"):
    K.align(loss_fn, PHI0, {"a": DELTA["a"]}, BATCH)
  with pytest.raises(JbatError, match=r"\['c'\]"):
    K.cosine(loss_fn, PHI0, {**DELTA, "c": jnp.zeros(2)}, BATCH)
  with pytest.raises(JbatError, match="target_grad"):
    K.less(loss_fn, PHIS, {"a": DELTA["a"]}, BATCH)
  with pytest.raises(JbatError, match="valid"):
    K.align(loss_fn, PHI0, DELTA, {k: v for k, v in BATCH.items() if k != "valid"})
  with pytest.raises(JbatError, match="key"):
    K.less(loss_fn, PHIS, jnp.zeros(8), BATCH, proj_dim=8)
  # Projected: the target must be the projected vector, not the gradient tree.
  with pytest.raises(JbatError, match=r"project_target.*got dict"):
    K.less(loss_fn, PHIS, DELTA, BATCH, key=jax.random.key(0), proj_dim=8)
  with pytest.raises(JbatError, match=r"words is uint32\[1, 36, 2\], expected uint32\[1, 36, 1\]"):
    K.project(jax.tree.map(lambda x: x[None], DELTA), None, 8,
              words=K.rademacher_words(jax.random.key(0), DELTA, 40))
  # Also at trace time under jit.
  with pytest.raises(JbatError, match=r"\['b'\]"):
    K.jit_kernel(K.align, loss_fn)(PHI0, bad_shape, BATCH)


def test_rademacher_projection_preserves_inner_products():
  n, d = 24, 2048
  rng = np.random.default_rng(0)
  # ~5000-dim vectors split over leaves, flattened into one vector of 5 blocks (fori_loop path).
  tree = {"x": jnp.asarray(rng.normal(size=(n, 40, 50)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(n, 3000)) + 0.5, jnp.float32)}
  key = jax.random.key(3)
  proj = jax.jit(K.project, static_argnums=2, static_argnames="block")
  p = np.asarray(proj(tree, key, d, block=1024), np.float64)
  u = np.concatenate([np.asarray(tree["x"]).reshape(n, -1), np.asarray(tree["y"])], 1)
  exact, approx = u @ u.T, p @ p.T
  norms = np.linalg.norm(u, axis=1)
  iu = np.triu_indices(n, 1)
  ok = np.abs(approx - exact)[iu] <= 0.1 * np.outer(norms, norms)[iu]
  assert ok.mean() >= 0.95
  # Matches the explicit matrix, is deterministic in the key, and changes with it.
  mats = K.rademacher_projection(key, jax.tree.map(lambda x: x[0], tree), d, block=1024)
  m = np.concatenate([np.asarray(mats["x"]), np.asarray(mats["y"])], 0)
  assert m.shape == (5000, d)
  assert set(np.unique(np.abs(m) * np.sqrt(d)).round(5)) == {1.0}
  np.testing.assert_allclose(p, u @ m, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(proj(tree, key, d, block=1024), p.astype(np.float32))
  assert not np.allclose(proj(tree, jax.random.key(4), d, block=1024), p)
  # The stored packed matrix gives the same projection without drawing random numbers.
  words = K.rademacher_words(key, jax.tree.map(lambda x: x[0], tree), d, block=1024)
  assert words.shape == (5, 1024, d // 32) and words.dtype == jnp.uint32
  assert K.words_nbytes(jax.tree.map(lambda x: x[0], tree), d, block=1024) == words.nbytes
  pw = jax.jit(lambda t, w: K.project(t, None, d, block=1024, words=w))(tree, words)
  np.testing.assert_allclose(pw, p, rtol=1e-6, atol=1e-5)


def test_rademacher_signs_are_the_bits_of_the_random_words():
  # The definition: the tree is flattened into one vector (leaves in order); column c of row r
  # (block j = r // rows) is the sign of bit c % 32 of word c // 32 of
  # jax.random.bits(fold_in(key, j)); d not a multiple of 32, blocks span leaf boundaries.
  key, d, rows = jax.random.key(7), 40, 4
  tree = {"a": jnp.zeros((3, 3)), "b": jnp.zeros((10,))}  # 19 entries: 5 blocks of 4 rows.
  mats = K.rademacher_projection(key, tree, d, block=rows)
  got = np.concatenate([np.asarray(mats["a"]), np.asarray(mats["b"])], 0)
  assert got.shape == (19, d)
  for j in range(5):
    w = np.asarray(jax.random.bits(jax.random.fold_in(key, j), (rows, 2), jnp.uint32))
    bits = (w[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    want = np.where(bits.reshape(rows, 64)[:, :d] == 0, 1.0, -1.0) / np.sqrt(d)
    block = got[j * rows:(j + 1) * rows]
    np.testing.assert_array_equal(block, want[:block.shape[0]].astype(np.float32))
  # Brute force: project of a batched tree = the flat rows times that dense matrix, with the
  # signs regenerated, or unpacked from the stored words; a single block (n <= block) too.
  rng = np.random.default_rng(1)
  batched = {"a": jnp.asarray(rng.normal(size=(3, 3, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)}
  flat = np.concatenate([np.asarray(batched["a"]).reshape(3, -1), np.asarray(batched["b"])], 1)
  words = K.rademacher_words(key, tree, d, block=rows)
  for kw in ({"key": key}, {"key": None, "words": words}):
    p = jax.jit(lambda t, k=None, w=None: K.project(t, k, d, block=rows, words=w))(
        batched, kw["key"], kw.get("words"))
    np.testing.assert_allclose(p, flat @ got, rtol=1e-5, atol=1e-5)
  one = K.rademacher_projection(key, tree, d, block=64)
  dense = np.concatenate([np.asarray(one["a"]), np.asarray(one["b"])], 0)
  np.testing.assert_allclose(K.project(batched, key, d, block=64), flat @ dense, rtol=1e-5,
                             atol=1e-5)
  # Fair, independent signs: mean ~0, columns nearly orthogonal over many rows.
  big = np.asarray(K.rademacher_projection(key, jnp.zeros(8192), 64)) * 8.0
  assert abs(big.mean()) < 0.03
  gram = big.T @ big / big.shape[0]
  assert np.abs(gram - np.eye(64)).max() < 0.06


def test_less_matches_brute_force_cosine():
  adapt = make_batch(12, 6)
  g_adapt = brute_grads(loss_fn, PHIS, adapt)
  target = J(K.mean_grad)(PHIS, adapt)
  np.testing.assert_allclose(flat(target), g_adapt.mean(0), rtol=1e-5, atol=1e-7)
  g = brute_grads(loss_fn, PHIS, BATCH)
  t = g_adapt.mean(0)
  want = (g @ t) / (np.linalg.norm(g, axis=1) * np.linalg.norm(t))
  np.testing.assert_allclose(J(K.less)(PHIS, target, BATCH), want, rtol=1e-5, atol=1e-6)
  # 36 parameters projected to 4096 dims: cosines within JL error.
  key = jax.random.key(0)
  pt = K.project_target(target, key, 4096)
  proj = J(K.less, proj_dim=4096)(PHIS, pt, BATCH, key=key)
  np.testing.assert_allclose(proj, want, atol=0.1)
  # Exactly the cosine of the explicitly projected vectors; the stored words give the same.
  mats = K.rademacher_projection(key, PHIS, 4096)
  m = np.concatenate([np.asarray(mats["a"]), np.asarray(mats["b"])], 0)
  pg, pt_want = g @ m, t @ m
  np.testing.assert_allclose(pt, pt_want, rtol=1e-4, atol=1e-5)
  cos = (pg @ pt_want) / (np.linalg.norm(pg, axis=1) * np.linalg.norm(pt_want))
  np.testing.assert_allclose(proj, cos, rtol=1e-4, atol=1e-5)
  words = K.rademacher_words(key, PHIS, 4096)
  np.testing.assert_allclose(J(K.less, proj_dim=4096)(PHIS, pt, BATCH, words=words), proj,
                             rtol=1e-6, atol=1e-6)


def test_random_scores_independent_of_batch_order():
  key = jax.random.key(5)
  ids = jnp.asarray([3, 17, 42, 1000, 7])
  s = np.asarray(K.random_scores(key, ids))
  perm = np.array([4, 2, 0, 3, 1])
  np.testing.assert_array_equal(K.random_scores(key, ids[perm]), s[perm])
  np.testing.assert_array_equal(K.random_scores(key, ids[:2]), s[:2])
  assert np.all((s >= 0) & (s < 1)) and len(set(s.tolist())) == 5
  # 64-bit ids as (hi, lo) words.
  hl = jnp.asarray([[1, 3], [0, 3]])
  a, b = np.asarray(K.random_scores(key, hl))
  assert a != b and b != s[0]
  with pytest.raises(JbatError, match="ids"):
    K.random_scores(key, jnp.zeros((3,), jnp.float32))


def test_jit_matches_eager():
  # The brute-force tests above run the kernels jitted (J); here jit agrees with eager mode for
  # the kernels that are cheap to run op by op, and both jit styles work.
  key = jax.random.key(4)
  pairs = {
      "align": (K.align(loss_fn, PHI0, DELTA, BATCH), J(K.align)(PHI0, DELTA, BATCH)),
      "loss_diff": (K.loss_diff(loss_fn, PHI0, PHIS, BATCH),
                    jax.jit(K.loss_diff, static_argnums=0)(loss_fn, PHI0, PHIS, BATCH)),
      "project": (K.project(DELTA, key, 8), jax.jit(K.project, static_argnums=2)(DELTA, key, 8)),
      "random": (K.random_scores(key, jnp.arange(6)), jax.jit(K.random_scores)(key, jnp.arange(6))),
  }
  for name, (eager, jitted) in pairs.items():
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6, err_msg=name)


def test_align_on_nnx_state():
  nnx = pytest.importorskip("flax.nnx")

  class Lora(nnx.Module):
    def __init__(self, phi):
      self.a = nnx.LoRAParam(phi["a"])
      self.b = nnx.LoRAParam(phi["b"])

  def state_loss(state, batch):
    return loss_fn({"a": state["a"][...], "b": state["b"][...]}, batch)

  s0 = nnx.state(Lora(PHI0), nnx.LoRAParam)
  ds = nnx.state(Lora(DELTA), nnx.LoRAParam)
  np.testing.assert_allclose(K.jit_kernel(K.align, state_loss)(s0, ds, BATCH),
                             J(K.align)(PHI0, DELTA, BATCH), rtol=1e-6)


# ----------------------------------------------------------------------------- dsir

TARGET = ["the patient had a fever and the doctor prescribed antibiotics",
          "symptoms of diabetes include thirst and fatigue, see a doctor",
          "the doctor examined the patient for fever and infection"]
POOL = ["the football team won the match in the final minute",
        "stock prices fell as the market reacted to interest rates",
        "the team scored a goal and the crowd cheered the match"]


def test_dsir_prefers_target_domain():
  tl = dsir.fit_ngram_model(TARGET, n_buckets=4096)
  pl = dsir.fit_ngram_model(POOL, n_buckets=4096)
  assert tl.shape == (4096,) and np.isclose((np.exp(tl) - dsir.FLOOR).sum(), 1.0)
  docs = ["a doctor treated the patient with fever", "the team won the football match", ""]
  s = dsir.dsir_scores(docs, tl, pl)
  assert s.dtype == np.float32 and s[0] > 0 > s[1] and s[2] == 0.0
  # Brute force, as the paper: word-punct tokens, unigram + bigram counts, p = count / total,
  # log(p + 1e-8), log w = sum over the document's n-grams (not length-normalised).
  def model(texts):
    counts = np.zeros(4096)
    for t in texts:
      for g in grams(t):
        counts[zlib.crc32(g.encode()) % 4096] += 1
    return np.log(counts / counts.sum() + 1e-8)

  def grams(t):
    toks = re.findall(r"\w+|[^\w\s]+", t.lower())
    return toks + [" ".join(p) for p in zip(toks, toks[1:])]

  np.testing.assert_allclose(tl, model(TARGET))
  want = [sum(tl[zlib.crc32(g.encode()) % 4096] - pl[zlib.crc32(g.encode()) % 4096]
              for g in grams(d)) for d in docs]
  np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)
  assert dsir.tokenize("Fever, cough!") == ["fever", ",", "cough", "!"]
  norm = dsir.dsir_scores(docs, tl, pl, normalize=True)
  n = [dsir.hash_ngrams(d, 4096).size for d in docs[:2]]
  np.testing.assert_allclose(norm[:2] * np.asarray(n), s[:2], rtol=1e-5)
  # Stable hashing: same numbers on every run (crc32, not Python's salted hash).
  assert dsir.hash_ngrams("Doctor doctor", 2**16).tolist() == dsir.hash_ngrams(
      "doctor DOCTOR", 2**16).tolist()
  with pytest.raises(JbatError, match="n_buckets"):
    dsir.dsir_scores(docs, tl, pl[:10])


def test_dsir_gumbel_top_k_resamples_by_importance_weight():
  # log w + Gumbel noise per (seed, id): the argmax is drawn with probability w / sum(w).
  log_w = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
  ids = np.asarray([11, 3, 2**40 + 7, 5])
  wins = np.bincount([int(np.argmax(log_w + dsir.gumbel_noise(seed, ids)))
                      for seed in range(4000)], minlength=4) / 4000
  np.testing.assert_allclose(wins, np.exp(log_w), atol=0.025)
  # A function of (seed, id) only: order does not matter, another seed differs.
  g = dsir.gumbel_noise(3, ids)
  np.testing.assert_array_equal(dsir.gumbel_noise(3, ids[::-1]), g[::-1])
  assert not np.allclose(dsir.gumbel_noise(4, ids), g)
  big = dsir.gumbel_noise(0, np.arange(100_000))
  assert abs(big.mean() - np.euler_gamma) < 0.02 and abs(big.std() - np.pi / np.sqrt(6)) < 0.02
  s = dsir.dsir_scores(["a b", "c"], np.zeros(8), np.zeros(8), gumbel=np.asarray([1.0, 2.0]))
  np.testing.assert_allclose(s, [1.0, 2.0])


def test_dsir_hash_is_stable_across_processes():
  import subprocess
  import sys
  code = ("from jbat.scoring.dsir import hash_ngrams;"
          "print(hash_ngrams('the patient had a fever', 65536).tolist())")
  outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": str(seed), "JAX_PLATFORMS": "cpu"},
                         check=True).stdout for seed in (1, 2)}
  assert len(outs) == 1
  assert outs.pop().strip() == str(dsir.hash_ngrams("the patient had a fever", 65536).tolist())
