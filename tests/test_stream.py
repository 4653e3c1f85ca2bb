"""Streaming scoring: equals the kernels applied directly, resumes, and rejects bad inputs."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jbat import lora, surrogate as surrogate_lib
from jbat.data import pipeline, sources, tokenizer as tokenizer_lib
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.scoring import dsir, kernels, stream
from jbat.scoring import less_warmup as less_lib
from jbat.training import loop
from tests import synthetic

MAX_LEN = 24
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
SPEC = loop.TrainSpec(steps=8, lr=2e-2, log_every=4)


def make_task(n_per_domain: int = 20, n_adapt: int = 6) -> sources.Task:
  docs = [sources.Document(id=i, text=d["text"], source="synthetic", label=d["domain"])
          for i, d in enumerate(synthetic.documents(n_per_domain, seed=0))]
  return sources.make_task(docs, "space", n_adapt, 0, seed=0)


def make_tokenizer(task: sources.Task, path: pathlib.Path):
  if path.exists():
    return tokenizer_lib.load_tokenizer(path)
  return tokenizer_lib.train_bpe_tokenizer([d.text for d in task.pool + task.adapt], 300, path)


def make_base(vocab: int) -> CausalLM:
  cfg = LMConfig.gpt2_like(vocab, max_len=MAX_LEN, d_model=32, n_layers=1, n_heads=4)
  return CausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("stream")
  task = make_task()
  tok = make_tokenizer(task, root / "tok.json")
  base = make_base(len(tok))
  adapt = pipeline.encode(task.adapt, tok, MAX_LEN)
  pool = pipeline.encode(task.pool, tok, MAX_LEN)
  sur = surrogate_lib.train_surrogate(base, LORA, adapt, SPEC, root / "surrogate", batch_size=4,
                                      max_len=MAX_LEN, pad_id=tok.pad_token_id, seed=0,
                                      progress=False)
  # Control surrogate: same spec / seed / init, trained on |D_A| pool documents.
  control = surrogate_lib.train_surrogate(base, LORA, pool[:len(adapt)], SPEC, root / "control",
                                          batch_size=4, max_len=MAX_LEN,
                                          pad_id=tok.pad_token_id, seed=0, progress=False)
  return dict(root=root, task=task, tok=tok, base=base, adapt=adapt, pool=pool, sur=sur,
              control=control)


def _direct(setup, names):
  """Every score from the kernels on ONE batch holding the whole pool (no streaming, no mesh)."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  loss_fn = surrogate_lib.per_example_loss_fn(sur.graphdef, sur.rest)
  batch = {k: jnp.asarray(v) for k, v in
           pipeline.pad_batch(pool, len(pool), MAX_LEN, tok.pad_token_id).items()
           if k != "id"}
  abatch = {k: jnp.asarray(v) for k, v in
            pipeline.pad_batch(setup["adapt"], len(setup["adapt"]), MAX_LEN,
                               tok.pad_token_id).items() if k != "id"}
  ids = np.asarray([ex["id"] for ex in pool], np.int64)

  @jax.jit
  def model_scores(phi0, phi_s, batch, abatch):
    fit = kernels.surrogate_fit(loss_fn, phi_s, batch)
    return {
        "align": kernels.align(loss_fn, phi0, kernels.tree_sub(phi_s, phi0), batch),
        "loss_diff": kernels.loss_diff(loss_fn, phi0, phi_s, batch),
        "cosine": kernels.cosine(loss_fn, phi0, kernels.tree_sub(phi_s, phi0), batch),
        "surrogate_fit": fit["neg_loss"], "surrogate_grad": fit["neg_grad_norm"],
        "less_1ckpt": kernels.less(loss_fn, phi_s, kernels.mean_grad(loss_fn, phi_s, abatch),
                                   batch),
    }

  out = dict(model_scores(sur.phi0, sur.phi_s, batch, abatch))
  # The new scores by brute force: one example at a time (batch of 1), float64 arithmetic.
  phi_c = setup["control"].phi_s
  one = jax.jit(lambda phi, b: loss_fn(phi, b)[0])
  rel, con = [], []
  for ex in pool:
    b1 = {k: jnp.asarray(v) for k, v in pipeline.pad_batch([ex], 1, MAX_LEN,
                                                           tok.pad_token_id).items() if k != "id"}
    l0, ls, lc = (float(one(phi, b1)) for phi in (sur.phi0, sur.phi_s, phi_c))
    rel.append((l0 - ls) / l0)
    con.append(lc - ls)
  out["rel_loss_diff"], out["contrast"] = np.asarray(rel), np.asarray(con)
  # contrast_align = -<grad l(z; phi0), phi_s - phi_c> from explicit per-example gradients.
  grads = jax.jit(kernels.per_example_grads, static_argnums=0)(loss_fn, sur.phi0, batch)
  delta_c = kernels.tree_sub(sur.phi_s, phi_c)
  out["contrast_align"] = -sum(
      np.asarray(g, np.float64).reshape(len(pool), -1) @ np.asarray(d, np.float64).reshape(-1)
      for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(delta_c)))
  out["random"] = kernels.random_scores(jax.random.key(0), stream._id_words(ids))
  if "less" in names:
    out["less"] = _brute_less(setup, batch_size=8, seed=0, spec=less_lib.LessWarmup())
  task = setup["task"]
  out["dsir"] = dsir.dsir_scores([d.text for d in task.pool],
                                 dsir.fit_ngram_model([d.text for d in task.adapt]),
                                 dsir.fit_ngram_model([d.text for d in task.pool]),
                                 gumbel=dsir.gumbel_noise(0, ids))
  return ids, {k: np.asarray(out[k]) for k in names}


def _brute_less(setup, batch_size, seed, spec):
  """LESS by brute force: float64 numpy Adam warm-up on the same subset and batch order
  (gradients of the batch mean loss from jax.grad), per-example gradients one example at a
  time, the Adam direction, the explicit dense projection matrix, cosines, weighted sum over
  checkpoints, max over adaptation examples."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  loss_fn = surrogate_lib.per_example_loss_fn(sur.graphdef, sur.rest)
  leaves0, treedef = jax.tree.flatten(sur.phi0)
  shapes = [x.shape for x in leaves0]
  unflat = lambda vec: jax.tree.unflatten(treedef, [
      jnp.asarray(part.reshape(shape), jnp.float32) for part, shape in zip(
          np.split(vec, np.cumsum([int(np.prod(sh)) for sh in shapes])[:-1]), shapes)])
  flat = lambda tree: np.concatenate([np.asarray(x, np.float64).reshape(-1)
                                      for x in jax.tree.leaves(tree)])
  pad = lambda exs: {k: jnp.asarray(v) for k, v in pipeline.pad_batch(
      exs, batch_size, MAX_LEN, tok.pad_token_id).items() if k != "id"}
  mean_grad = jax.jit(jax.grad(lambda p, b: jnp.sum(loss_fn(p, b) * b["valid"])
                               / jnp.sum(b["valid"])))
  one_grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
  picks = less_lib.warmup_indices(len(pool), spec.fraction, seed, min_count=batch_size)
  subset = [pool[i] for i in picks]
  n_steps = -(-len(subset) // batch_size)
  lrs = less_lib.linear_schedule(spec.epochs * n_steps, spec.lr, spec.warmup_ratio)
  phi, m, v, t, ckpts = flat(sur.phi0), 0.0, 0.0, 0, []
  for epoch in range(spec.epochs):
    order = np.random.default_rng([seed, 0x1E55, epoch]).permutation(len(subset))
    exs = [subset[i] for i in order]
    for lo in range(0, len(exs), batch_size):
      g = flat(mean_grad(unflat(phi), pad(exs[lo:lo + batch_size])))
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g * g
      phi = phi - lrs[t] * (m / (1 - 0.9 ** (t + 1))) / (
          np.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8)
      t += 1
    ckpts.append((phi.copy(), m.copy(), v.copy(), lrs[t - n_steps:t].mean()))
  mats = kernels.rademacher_projection(jax.random.key(seed), sur.phi0, spec.proj_dim)
  R = np.concatenate([np.asarray(x, np.float64) for x in jax.tree.leaves(mats)], 0)
  unit = lambda x: x / np.linalg.norm(x)
  total = np.zeros((len(pool), len(setup["adapt"])))
  weights = np.asarray([c[3] for c in ckpts])
  for (phi_c, m_c, v_c, _), w in zip(ckpts, weights / weights.sum()):
    grad1 = lambda ex: flat(one_grad(unflat(phi_c), pad([ex])))
    fa = np.stack([unit(grad1(ex) @ R) for ex in setup["adapt"]])
    fp = []
    for ex in pool:
      g = grad1(ex)
      u = (0.9 * m_c + 0.1 * g) / np.sqrt(0.999 * v_c + 0.001 * g * g + 1e-8)
      fp.append(unit(u @ R))
    total += w * np.stack(fp) @ fa.T
  return total.max(axis=1)


def test_surrogate_delta_and_reload(setup):
  sur = setup["sur"]
  kernels.check_same_structure(sur.phi0, sur.phi_s)
  assert float(kernels.tree_norm(sur.delta)) > 0  # Training moved the adapter.
  flat0 = lora.adapter_to_flat(sur.phi0)
  assert all(np.all(v == 0) for k, v in flat0.items() if k.endswith("lora_b"))  # B = 0 at init.
  again = surrogate_lib.train_surrogate(setup["base"], LORA, setup["adapt"], SPEC,
                                        setup["root"] / "surrogate", batch_size=4,
                                        max_len=MAX_LEN, pad_id=setup["tok"].pad_token_id,
                                        seed=0, progress=False)
  for a, b in zip(jax.tree.leaves(again.phi_s), jax.tree.leaves(sur.phi_s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_surrogate_cache_skips_training_in_a_new_workdir(setup, tmp_path):
  kw = dict(batch_size=4, max_len=MAX_LEN, pad_id=setup["tok"].pad_token_id, progress=False,
            cache_dir=tmp_path / "surrogates")
  first = surrogate_lib.train_surrogate(setup["base"], LORA, setup["adapt"], SPEC, tmp_path / "a",
                                        seed=0, **kw)
  second = surrogate_lib.train_surrogate(setup["base"], LORA, setup["adapt"], SPEC,
                                         tmp_path / "b", seed=0, **kw)
  assert (tmp_path / "a" / "fit").exists() and not (tmp_path / "b" / "fit").exists()
  for x in (first, second):  # Cached or not: the surrogate trained without a cache.
    for a, b in zip(jax.tree.leaves(x.phi_s), jax.tree.leaves(setup["sur"].phi_s)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Other inputs (another initial adapter) are another key: trained, not loaded.
  surrogate_lib.train_surrogate(setup["base"], LORA, setup["adapt"], SPEC, tmp_path / "c",
                                seed=0, init=setup["sur"].phi_s, **kw)
  assert (tmp_path / "c" / "fit").exists()
  assert len(list((tmp_path / "surrogates").iterdir())) == 2


def test_scores_equal_kernels(setup, tmp_path):
  names = list(stream.SCORE_NAMES)
  task = setup["task"]
  table = stream.score_pool(
      names, setup["sur"], setup["pool"], tmp_path / "s",
      stream.Batches(8, MAX_LEN, setup["tok"].pad_token_id, chunk_batches=2),
      adapt_examples=setup["adapt"],
      texts=([d.text for d in task.pool], [d.text for d in task.adapt]), seed=0,
      progress=False, control=setup["control"])
  ids, want = _direct(setup, names)
  np.testing.assert_array_equal(table.ids, ids)
  for name in names:
    assert table.scores[name].dtype == np.float32
    # loss_diff is a difference of two ~4-nat losses: float32 cancellation needs atol 1e-5.
    atol = 1e-5 if name in ("loss_diff", "rel_loss_diff", "contrast") else 1e-6
    atol = 1e-4 if name == "less" else atol  # float32 warm-up against float64.
    np.testing.assert_allclose(table.scores[name], want[name], rtol=1e-5, atol=atol,
                               err_msg=name)


def test_resume_from_cursor_reproduces_chunks(setup, tmp_path):
  names = ["align", "dsir", "random"]
  task = setup["task"]
  kw = dict(batches=stream.Batches(8, MAX_LEN, setup["tok"].pad_token_id, chunk_batches=2),
            texts=([d.text for d in task.pool], [d.text for d in task.adapt]),
            seed=0, progress=False)
  table = stream.score_pool(names, setup["sur"], setup["pool"], tmp_path, **kw)
  chunks = sorted(tmp_path.glob("chunk_*.npz"))
  assert len(chunks) == -(-len(setup["pool"]) // 16) >= 3
  before = {p.name: p.read_bytes() for p in chunks}
  for p in chunks[1:]:
    p.unlink()
  cursor = tmp_path / "cursor.json"
  c = json.loads(cursor.read_text())
  c.update(next_chunk=1, done=False)
  cursor.write_text(json.dumps(c))
  with pytest.raises(JbatError, match="not finished"):
    stream.load_table(tmp_path)
  again = stream.score_pool(names, setup["sur"], setup["pool"], tmp_path, **kw)
  after = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("chunk_*.npz"))}
  assert after == before
  for name in names:
    np.testing.assert_array_equal(again.scores[name], table.scores[name])


def test_padding_and_batch_size_do_not_change_scores(setup, tmp_path):
  pad = setup["tok"].pad_token_id
  a = stream.score_pool(["align", "loss_diff"], setup["sur"], setup["pool"], tmp_path / "a",
                        stream.Batches(8, MAX_LEN, pad), progress=False)
  b = stream.score_pool(["align", "loss_diff"], setup["sur"], setup["pool"], tmp_path / "b",
                        stream.Batches(5, MAX_LEN, pad, chunk_batches=3), progress=False)
  for name in ("align", "loss_diff"):
    np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=1e-5, atol=1e-6)


def test_other_inputs_in_same_dir_is_an_error(setup, tmp_path):
  kw = dict(batches=stream.Batches(8, MAX_LEN, setup["tok"].pad_token_id), progress=False)
  stream.score_pool(["align"], setup["sur"], setup["pool"], tmp_path, **kw)
  with pytest.raises(JbatError, match="fingerprint"):
    stream.score_pool(["align"], setup["sur"], setup["pool"][:-1], tmp_path, **kw)


def test_bad_inputs(setup, tmp_path):
  sur, pool = setup["sur"], setup["pool"]
  kw = dict(batches=stream.Batches(8, MAX_LEN, setup["tok"].pad_token_id), progress=False)
  with pytest.raises(JbatError, match="pool is empty"):
    stream.score_pool(["align"], sur, [], tmp_path / "e", **kw)
  with pytest.raises(JbatError, match="distinct names"):
    stream.score_pool(["alignment"], sur, pool, tmp_path / "u", **kw)
  # delta (phi_s) with the wrong tree structure: one adapter leaf missing.
  flat = lora.adapter_to_flat(sur.phi_s)
  dropped = sorted(flat)[0]
  bad_phi_s = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(sur.phi_s)
                                   if ".".join(map(str, p)) != dropped])
  with pytest.raises(JbatError, match="phi_s must have the tree structure of phi0"):
    stream.score_pool(["align"], dataclasses.replace(sur, phi_s=bad_phi_s), pool,
                      tmp_path / "d", **kw)
  # NaN scores: a NaN in phi_s makes every model score NaN; the first 10 ids are reported.
  nan_phi_s = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), sur.phi_s)
  ids = [ex["id"] for ex in pool]
  with pytest.raises(JbatError) as err:
    stream.score_pool(["loss_diff"], dataclasses.replace(sur, phi_s=nan_phi_s), pool,
                      tmp_path / "n", **kw)
  assert "non-finite" in str(err.value) and str(ids[:10]) in str(err.value)
  assert not (tmp_path / "n" / "chunk_000000.npz").exists()
  with pytest.raises(JbatError, match="need a surrogate"):
    stream.score_pool(["align"], None, pool, tmp_path / "s", **kw)
  with pytest.raises(JbatError, match="need a control surrogate"):
    stream.score_pool(["contrast"], sur, pool, tmp_path / "c", **kw)


def test_grad_features_and_cosine_matrix(setup, tmp_path):
  """Features equal the projection of explicit per-example gradients; resumable; cosines."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  kw = dict(proj_dim=16, batches=stream.Batches(8, MAX_LEN, tok.pad_token_id, chunk_batches=2),
            seed=3, progress=False)
  ids, feats = stream.pool_grad_features(sur, pool, tmp_path, **kw)
  assert feats.shape == (len(pool), 16) and feats.dtype == np.float32
  np.testing.assert_array_equal(ids, [ex["id"] for ex in pool])
  loss_fn = surrogate_lib.per_example_loss_fn(sur.graphdef, sur.rest)
  batch = {k: jnp.asarray(v) for k, v in
           pipeline.pad_batch(pool, len(pool), MAX_LEN, tok.pad_token_id).items() if k != "id"}
  grads = kernels.per_example_grads(loss_fn, sur.phi_s, batch)
  mats = kernels.rademacher_projection(jax.random.key(3), sur.phi_s, 16)
  want = sum(np.asarray(g).reshape(len(pool), -1) @ np.asarray(m)
             for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mats)))
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
  stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("chunk_*.npz")}
  ids2, feats2 = stream.pool_grad_features(sur, pool, tmp_path, **kw)  # Cached: no recompute.
  assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("chunk_*.npz")} == stamp
  np.testing.assert_array_equal(feats2, feats)
  c = stream.cosine_matrix(feats, feats[:3], chunk=7)
  brute = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in feats[:3]]
                    for a in feats])
  np.testing.assert_allclose(c, brute, rtol=1e-5, atol=1e-6)



def test_projected_less_equals_kernel_with_and_without_stored_matrix(setup, tmp_path,
                                                                     monkeypatch):
  """less_1ckpt with less_proj_dim: target projected once; stored words and the RNG agree."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  kw = dict(batches=stream.Batches(8, MAX_LEN, tok.pad_token_id, chunk_batches=2),
            adapt_examples=setup["adapt"], seed=2, less_proj_dim=64, progress=False)
  stored = stream.score_pool(["less_1ckpt"], sur, pool, tmp_path / "w", **kw).scores["less_1ckpt"]
  monkeypatch.setattr(stream, "MAX_PROJECTION_WORDS_BYTES", 0)  # Regenerate per batch instead.
  fresh = stream.score_pool(["less_1ckpt"], sur, pool, tmp_path / "k", **kw).scores["less_1ckpt"]
  np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-6)
  # Direct: the cosine of the explicitly projected gradients (same key, explicit matrix).
  loss_fn = surrogate_lib.per_example_loss_fn(sur.graphdef, sur.rest)
  pad = lambda exs: {k: jnp.asarray(v) for k, v in
                     pipeline.pad_batch(exs, len(exs), MAX_LEN, tok.pad_token_id).items()
                     if k != "id"}
  flat = lambda tree, b: np.concatenate(
      [np.asarray(x, np.float64).reshape(b, -1) for x in jax.tree.leaves(tree)], 1)
  g = flat(kernels.per_example_grads(loss_fn, sur.phi_s, pad(pool)), len(pool))
  t = flat(kernels.mean_grad(loss_fn, sur.phi_s, pad(setup["adapt"])), 1)[0]
  m = np.concatenate([np.asarray(x, np.float64) for x in jax.tree.leaves(
      kernels.rademacher_projection(jax.random.key(2), sur.phi_s, 64))], 0)
  pg, pt = g @ m, t @ m
  want = pg @ pt / (np.linalg.norm(pg, axis=1) * np.linalg.norm(pt))
  np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-5)
  # A finished folder is reused; another projection size is refused (fingerprint).
  again = stream.score_pool(["less_1ckpt"], sur, pool, tmp_path / "w", **kw).scores["less_1ckpt"]
  np.testing.assert_array_equal(again, stored)
  with pytest.raises(JbatError, match="fingerprint"):
    stream.score_pool(["less_1ckpt"], sur, pool, tmp_path / "w", **{**kw, "less_proj_dim": 32})


def test_less_warmup_scores_are_bitwise_the_same_with_the_stored_matrix(setup, tmp_path,
                                                                       monkeypatch):
  """less: the packed matrix made once per run gives exactly the per-batch regenerated one."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  made = []
  monkeypatch.setattr(stream, "_projection_words",
                      lambda *a, _f=stream._projection_words: made.append(_f(*a)) or made[-1])
  kw = dict(batches=stream.Batches(8, MAX_LEN, tok.pad_token_id, chunk_batches=2),
            adapt_examples=setup["adapt"], seed=3, progress=False,
            less_warmup=less_lib.LessWarmup(proj_dim=64, epochs=2))
  stored = stream.score_pool(["less"], sur, pool, tmp_path / "w", **kw).scores["less"]
  assert made and made[-1] is not None  # The stored matrix was used.
  monkeypatch.setattr(stream, "MAX_PROJECTION_WORDS_BYTES", 0)  # Regenerate per batch instead.
  fresh = stream.score_pool(["less"], sur, pool, tmp_path / "k", **kw).scores["less"]
  assert made[-1] is None
  np.testing.assert_array_equal(stored, fresh)
  assert np.all(np.isfinite(stored)) and np.ptp(stored) > 0


def test_less_pool_pass_in_bigger_batches_keeps_the_warmup(setup, tmp_path):
  """LessWarmup.batch_size: the pool scored in batches of 16 with the warm-up at 8 gives the
  scores of batches of 8 throughout (up to float32 rounding); a warm-up at 16 does not."""
  sur, pool, tok = setup["sur"], setup["pool"], setup["tok"]
  kw = dict(adapt_examples=setup["adapt"], seed=3, progress=False)
  spec = less_lib.LessWarmup(proj_dim=64, epochs=2)
  at = lambda b, warm, name: stream.score_pool(
      ["less"], sur, pool, tmp_path / name, stream.Batches(b, MAX_LEN, tok.pad_token_id),
      less_warmup=dataclasses.replace(spec, batch_size=warm), **kw).scores["less"]
  small = at(8, None, "s")
  big = at(16, 8, "b")
  np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-6)
  assert np.abs(at(16, None, "w") - small).max() > 1e-3  # The warm-up batch matters.
  with pytest.raises(JbatError, match="warm-up batch_size"):
    less_lib.LessWarmup(batch_size=0)


def test_shared_score_cache_is_reused_by_a_new_out_dir(setup, tmp_path):
  """cache_dir: a second run with the same inputs (a fresh workdir) reads the cached chunks."""
  kw = dict(batches=stream.Batches(8, MAX_LEN, setup["tok"].pad_token_id, chunk_batches=2),
            seed=0, progress=False, cache_dir=tmp_path / "cache")
  first = stream.score_pool(["align", "random"], setup["sur"], setup["pool"], tmp_path / "a",
                            **kw)
  (folder,) = (tmp_path / "cache").iterdir()
  assert json.loads((tmp_path / "a" / "source.json").read_text())["scores"] == str(folder)
  assert not list((tmp_path / "a").glob("chunk_*"))
  stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  second = stream.score_pool(["align", "random"], setup["sur"], setup["pool"], tmp_path / "b",
                             **kw)
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp  # Nothing rescored.
  np.testing.assert_array_equal(first.ids, second.ids)
  for name in ("align", "random"):
    np.testing.assert_array_equal(first.scores[name], second.scores[name])
  other = stream.score_pool(["align"], setup["sur"], setup["pool"], tmp_path / "c", **kw)
  assert len(list((tmp_path / "cache").iterdir())) == 2  # Other scores: another fingerprint.
  np.testing.assert_array_equal(other.scores["align"], first.scores["align"])


@pytest.mark.parametrize("less_batch_size", [0, 16])
def test_albat_passes_less_batch_size_to_the_pool_pass_only(tmp_path, monkeypatch,
                                                            less_batch_size):
  """select.less_batch_size: the `less` pool pass in its batches, the warm-up at batch_size."""
  from jbat import albat, selection  # pylint: disable=import-outside-toplevel
  seen = {}

  class Stop(Exception):
    pass

  def score_pool(scores, sur, pool, out_dir, batches, **kw):
    seen.update(scores=scores, batch=batches.batch_size, warmup=kw.get("less_warmup"))
    raise Stop

  monkeypatch.setattr(surrogate_lib, "train_surrogate", lambda *a, **k: None)
  monkeypatch.setattr(stream, "score_pool", score_pool)
  task = make_task()
  spec = selection.SelectSpec(score="less", k=4, batch_size=8, less_batch_size=less_batch_size,
                              less_proj_dim=32)
  tok = type("Tok", (), {"pad_token_id": 0})()
  with pytest.raises(Stop):
    albat.select_backbone_data(None, LORA, task, tok, spec, surrogate_spec=SPEC,
                               max_len=MAX_LEN, seed=0, workdir=tmp_path, progress=False,
                               adapt_examples=[{}], pool_examples=[{}])
  assert seen["scores"] == ["less"]
  if less_batch_size:
    assert seen["batch"] == 16
    assert seen["warmup"] == less_lib.LessWarmup(proj_dim=32, batch_size=8)
  else:  # The warm-up at the pool pass's batch: the settings record (fingerprint) of before.
    assert seen["batch"] == 8 and seen["warmup"] == less_lib.LessWarmup(proj_dim=32)
    assert "batch_size" not in seen["warmup"].record()
