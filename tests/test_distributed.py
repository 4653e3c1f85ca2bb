"""jbat.distributed and the memory options for big backbones: the `model` mesh axis, gradient
accumulation and rematerialisation give the same numbers as the plain run."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jbat import distributed, lora
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = LMConfig(vocab_size=64, max_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def _batch(b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, 64, (b, t)).astype(np.int32),
          "targets": rng.integers(0, 64, (b, t)).astype(np.int32),
          "weights": np.ones((b, t), np.float32)}


def _adapted(cfg):
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  # Non-zero B matrices, so the LoRA gradients are not trivially zero.
  g, phi, rest = lora.split(model)
  phi = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), phi)
  return g, phi, rest


def _step(cfg, grad_accum):
  g, phi, rest = _adapted(cfg)
  spec = loop.TrainSpec(steps=10, lr=1e-2)
  tx = loop.make_optimizer(spec)
  rng = np.asarray(jax.random.key_data(jax.random.key(0)))
  return loop.train_step(phi, tx.init(phi), rest, rng, _batch(), graphdef=g, tx=tx,
                         grad_accum=grad_accum)


def test_grad_accum_equals_full_batch_step():
  p1, _, _, m1 = _step(CFG, 1)
  p4, _, _, m4 = _step(CFG, 4)
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(p1), jax.tree.leaves(_adapted(CFG)[1])))  # The step moved.


def test_remat_gives_the_same_logits_and_step():
  p1, _, _, m1 = _step(CFG, 1)
  p2, _, _, m2 = _step(dataclasses.replace(CFG, remat=True), 1)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_local_rows_and_initialize_errors(monkeypatch):
  mesh = distributed.make_mesh()
  assert distributed.local_rows(8, mesh) == slice(0, 8)
  assert distributed.initialize(None) == {"process_index": 0, "process_count": 1}
  monkeypatch.setenv("JBAT_NUM_PROCESSES", "2")
  with pytest.raises(JbatError, match="JBAT_COORDINATOR"):
    distributed.initialize(None)
  with pytest.raises(JbatError, match="mesh.model"):
    distributed.make_mesh(model=3, devices=jax.devices() * 2)


_SCRIPT = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from jbat import distributed, lora, surrogate as S
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.scoring import stream
from jbat.training import loop
cfg = LMConfig(vocab_size=64, max_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
base = CausalLM(cfg, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
pool = [{"id": i, "ids": rng.integers(1, 64, int(rng.integers(4, 17))).tolist()} for i in range(40)]
adapt = pool[:8]
spec = loop.TrainSpec(steps=6, lr=1e-2)
out = {}
for name, mesh in (("1d", distributed.make_mesh(1, jax.devices()[:1])),
                   ("2d", distributed.make_mesh(2))):
  sur = S.train_surrogate(base, lora.LoRAConfig(rank=4, alpha=8.0), adapt, spec,
                          sys.argv[1] + "/sur_" + name, batch_size=8, max_len=16, pad_id=0, seed=0,
                          mesh=mesh, progress=False)
  table = stream.score_pool(["align", "loss_diff"], sur, pool, sys.argv[1] + "/sc_" + name,
                            stream.Batches(8, 16, 0), mesh=mesh, progress=False)
  out[name] = {k: v.tolist() for k, v in table.scores.items()}
  out[name]["mesh"] = dict(mesh.shape)
print(json.dumps(out))
"""


def test_model_axis_mesh_matches_one_device(tmp_path):
  """data=4 x model=2 (backbone split over `model`) vs 1 device: same surrogate and scores."""
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["2d"]["mesh"] == {"data": 4, "model": 2} and out["1d"]["mesh"] == {"data": 1}
  for score in ("align", "loss_diff"):
    a, b = np.asarray(out["1d"][score]), np.asarray(out["2d"][score])
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
    assert np.abs(a).max() > 0


def test_tpu_pod_config_validates(tmp_path):
  """configs/tpu_pod.py is a valid config once its paths exist (they are site-specific)."""
  import importlib.util
  from jbat import config as config_lib
  spec = importlib.util.spec_from_file_location("tpu_pod", ROOT / "configs/tpu_pod.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  (tmp_path / "c.jsonl").write_text('{"text": "a", "domain": "target"}\n')
  for arg in (None, "local"):
    c = mod.get_config(arg)
    with pytest.raises(JbatError, match="data.path|model.pretrained"):
      config_lib.validate(c)
    c.data.path, c.model.pretrained = str(tmp_path / "c.jsonl"), str(tmp_path / "hf")
    config_lib.validate(c)
    assert c.stop_after == "select" and c.model.remat
