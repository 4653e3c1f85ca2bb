"""LESS as its authors run it (jbat.scoring.less_warmup): the pieces against brute force.

The whole procedure (warm-up, Adam-preconditioned projected features, matching) is checked
against a float64 brute force through `stream.score_pool` in tests/test_stream.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbat.errors import JbatError
from jbat.scoring import less_warmup as L


def test_linear_schedule_and_warmup_subset():
  lrs = L.linear_schedule(10, 1.0, 0.2)  # 2 warm-up steps, then linear decay to 0.
  np.testing.assert_allclose(lrs, [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
  picks = L.warmup_indices(1000, 0.05, seed=3)
  assert len(picks) == 50 and len(set(picks.tolist())) == 50 and np.all(np.diff(picks) > 0)
  np.testing.assert_array_equal(picks, L.warmup_indices(1000, 0.05, seed=3))
  assert not np.array_equal(picks, L.warmup_indices(1000, 0.05, seed=4))
  assert len(L.warmup_indices(20, 0.05, seed=0, min_count=8)) == 8
  assert len(L.warmup_indices(5, 0.05, seed=0, min_count=8)) == 5
  with pytest.raises(JbatError, match="fraction"):
    L.LessWarmup(fraction=0.0)
  with pytest.raises(JbatError, match="epochs"):
    L.LessWarmup(epochs=0)


def test_adam_step_is_optax_adam_and_direction_is_less_formula():
  rng = np.random.default_rng(0)
  phi = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  m = jax.tree.map(jnp.zeros_like, phi)
  v = jax.tree.map(jnp.zeros_like, phi)
  tx = optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)
  ref, state = phi, tx.init(phi)
  for t in range(3):
    g = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    phi, m, v = L.adam_step(phi, m, v, g, jnp.float32(1e-2), jnp.int32(t), 0.9, 0.999, 1e-8)
    upd, state = tx.update(g, state, ref)
    ref = optax.apply_updates(ref, upd)
  np.testing.assert_allclose(phi["a"], ref["a"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["a"], state[0].mu["a"], rtol=1e-6)
  np.testing.assert_allclose(v["a"], state[0].nu["a"], rtol=1e-6)
  g = rng.normal(size=(2, 5))
  mm, vv = rng.normal(size=5), rng.random(5)
  want = (0.9 * mm + 0.1 * g) / np.sqrt(0.999 * vv + 0.001 * g ** 2 + 1e-8)
  np.testing.assert_allclose(L.adam_direction(jnp.asarray(g), jnp.asarray(mm), jnp.asarray(vv),
                                              0.9, 0.999, 1e-8), want, rtol=1e-5)


def test_combine_is_weighted_sum_then_max_over_valid_adaptation_rows():
  rng = np.random.default_rng(1)
  pool, adapt = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 5, 6))
  valid = np.asarray([True, True, False, True, False])
  w = np.asarray([1.0, 3.0, 0.0])
  got = L.combine(jnp.asarray(pool, jnp.float32), jnp.asarray(adapt, jnp.float32),
                  jnp.asarray(valid), jnp.asarray(w, jnp.float32))
  want = np.full(4, -np.inf)
  for b in range(4):
    for k in np.flatnonzero(valid):
      want[b] = max(want[b], sum(w[c] / w.sum() * pool[c, b] @ adapt[c, k] for c in range(3)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
