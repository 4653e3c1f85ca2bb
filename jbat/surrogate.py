"""ALBAT stage 1: the surrogate adapter (docs/method.md, "Stages" 1).

A fresh LoRA adapter on a copy of the frozen backbone is trained on the adaptation set D_A only
(`loop.fit`, so the run checkpoints and resumes). We keep

  phi_0   the adapter at init (B = 0: the adapted model equals the backbone),
  phi_s   the trained surrogate adapter,
  delta = phi_s - phi_0   (points from the backbone toward the adaptation optimum),

plus the graphdef and the frozen rest of the model state, which together with an adapter give
back the model: `nnx.merge(graphdef, adapter, rest)`. phi_0 and phi_s are saved as safetensors
under the workdir; a later call with the same workdir loads them instead of training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jbat import distributed, io, lora, losses, trees
from jbat.data import pipeline
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM
from jbat.training import loop

PHI0_FILE = "phi0.safetensors"
PHI_S_FILE = "phi_s.safetensors"


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """The pieces the scoring kernels need; adapters are nnx.State trees of LoRAParam leaves."""

  graphdef: nnx.GraphDef
  phi0: nnx.State  # Adapter at init.
  phi_s: nnx.State  # Trained surrogate adapter (same tree structure as phi0).
  rest: nnx.State  # Frozen backbone state (everything that is not an adapter leaf).

  @property
  def delta(self) -> Any:
    """delta = phi_s - phi0, leafwise (tree of phi0)."""
    return trees.tree_sub(self.phi_s, self.phi0)


def per_example_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State,
                        model_loss: Callable[[Any, dict[str, Any]], jax.Array] = (
                            losses.lm_per_example_loss)
                        ) -> Callable[[Any, dict[str, Any]], jax.Array]:
  """loss_fn(adapter, batch) -> f32[B]: l(z_i; adapter) = model_loss(merged model, batch), by
  default the mean token NLL of each row (a Scorable's `loss`, jbat.scorable).

  The kernels' contract (jbat.scoring.kernels): row i depends only on row i of the batch.
  `rest` may be a traced argument (pass it through jit instead of closing over constants).
  """
  def loss_fn(adapter: Any, batch: dict[str, Any]) -> jax.Array:
    return model_loss(nnx.merge(graphdef, adapter, rest), batch)
  return loss_fn


def _host(tree: Any) -> Any:
  """The tree with numpy leaves (gathered from devices), for saving and deterministic reuse."""
  return jax.tree.map(lambda x: np.asarray(distributed.host_array(x)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


def cache_key(phi0: Any, rest: Any, adapt_examples: Sequence[dict[str, Any]],
              spec: loop.TrainSpec, hash_examples: Callable[[Any, Sequence[dict[str, Any]]], None]
              = pipeline.hash_examples, **settings: Any) -> str:
  """sha256 (first 16 hex) of everything that determines phi_s: the initial adapter and the
  frozen backbone values, the adaptation examples (`hash_examples`, a Scorable's; by default
  the LM's tokens), the training spec and batch settings."""
  h = hashlib.sha256(json.dumps({"spec": dataclasses.asdict(spec), **settings, "version": 1},
                                sort_keys=True).encode())
  for tree in (phi0, rest):
    io.hash_tree(h, tree)
  hash_examples(h, adapt_examples)
  return h.hexdigest()[:16]


def train_surrogate(base: CausalLM, lora_cfg: lora.LoRAConfig,
                    adapt_examples: Sequence[dict[str, Any]], spec: loop.TrainSpec,
                    workdir: str | pathlib.Path, *, batch_size: int, max_len: int, pad_id: int,
                    seed: int, mesh: jax.sharding.Mesh | None = None,
                    progress: bool = True, init: nnx.State | None = None,
                    cache_dir: str | pathlib.Path | None = None) -> Surrogate:
  """Trains (or reloads) the surrogate adapter phi_s on the adaptation set only.

  Args:
    base: the frozen backbone (not modified: a clone gets the LoRA layers).
    lora_cfg: adapter rank / alpha / targets; the adapter is initialised with nnx.Rngs(seed).
    adapt_examples: encoded adaptation examples ({"id", "ids"}, see pipeline.encode).
    spec: optimisation settings for `loop.fit`.
    workdir: holds phi0.safetensors, phi_s.safetensors and the fit run (fit/: checkpoints,
      metrics.jsonl). If both adapter files exist they are loaded and nothing is trained.
    batch_size, max_len, pad_id, seed: the training stream (pipeline.train_loader).
    init: start from this adapter (a tree like the adapter's) instead of a fresh init: phi_0 is
      then `init`, e.g. the adapter of a BAT run at a re-selection step, and phi_s - phi_0
      points from there toward the adaptation optimum.
    cache_dir: a folder shared between runs (e.g. <cache_dir>/surrogates): phi_s is kept there
      under a content key of everything that determines it (backbone and initial adapter
      values, adaptation tokens, spec, batch settings, seed), so a new workdir with the same
      inputs loads it instead of training.
  Returns:
    Surrogate(graphdef, phi0, phi_s, rest) with numpy leaves.
  Raises:
    JbatError: empty adaptation set, or saved adapters that do not fit this model/config.
  """
  if len(adapt_examples) == 0:
    raise JbatError("surrogate: the adaptation set is empty (need at least one example)")
  model = nnx.clone(base)
  lora.apply_lora(model, lora_cfg, rngs=nnx.Rngs(seed))
  key = None
  if cache_dir is not None:
    key = lambda phi0, rest: cache_key(phi0, rest, adapt_examples, spec, batch_size=batch_size,
                                       max_len=max_len, pad_id=pad_id, seed=seed)
  # Every process reads the whole (small) adaptation set and every device computes the whole
  # batch: no cross-device gradient sum, so phi_s is bitwise the same however the run is
  # split into processes.
  return fit_surrogate(
      model, lambda: pipeline.train_loader(adapt_examples, batch_size, max_len, pad_id, seed),
      spec, workdir, init=init, key=key, cache_dir=cache_dir, mesh=mesh, progress=progress)


def fit_surrogate(model: nnx.Module, train_iter: Callable[[], Any], spec: loop.TrainSpec,
                  workdir: str | pathlib.Path, *, init: nnx.State | None = None,
                  key: Callable[[Any, Any], str] | None = None,
                  cache_dir: str | pathlib.Path | None = None,
                  mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                  **fit_kwargs: Any) -> Surrogate:
  """Trains (or reloads) the surrogate adapter of any model: the one stage 1 of both
  modalities (`train_surrogate` is the LM's call of it).

  Args:
    model: the frozen backbone with a fresh adapter (its nnx.LoRAParam leaves are phi_0);
      trained in place.
    train_iter: () -> the iterator of training batches on the adaptation set only (called
      only when training is needed).
    spec: optimisation settings for `loop.fit`.
    workdir: phi0.safetensors, phi_s.safetensors and the fit run (fit/); when both adapter
      files exist they are loaded and nothing is trained.
    init: start from this adapter instead of the fresh one (phi_0 is then `init`).
    key: (phi0, rest) -> content key of everything that determines phi_s (`cache_key`); with
      `cache_dir`, phi_s is kept in cache_dir/<key>/ and reused by a new workdir.
    **fit_kwargs: passed to `loop.fit` (loss_fn, batch_keys for a non-LM model). Batches are
      replicated on every device (no cross-device gradient sum), so phi_s does not depend on
      how the run is split into processes.
  Returns:
    Surrogate(graphdef, phi0, phi_s, rest) with numpy leaves, reloaded from disk (a fresh
    and a resumed run hold bitwise the same values).
  Raises:
    JbatError: saved adapters that do not fit this model; Diverged (loop.fit).
  """
  workdir = pathlib.Path(workdir)
  if init is not None:
    trees.check_same_structure(nnx.state(model, nnx.LoRAParam), init, name="init adapter")
    nnx.update(model, init)
  graphdef, phi0, rest = lora.split(model)
  phi0, rest = _host(phi0), _host(rest)
  phi0_path, phi_s_path = workdir / PHI0_FILE, workdir / PHI_S_FILE
  if phi0_path.exists() and phi_s_path.exists():
    return Surrogate(graphdef, io.load_tree(phi0_path, phi0), io.load_tree(phi_s_path, phi0),
                     rest)
  cached = None
  if cache_dir is not None and key is not None:
    cached = pathlib.Path(cache_dir) / key(phi0, rest) / PHI_S_FILE
  if distributed.is_main():
    io.save_tree(phi0, phi0_path)
  if cached is not None and cached.exists():
    if distributed.is_main():
      io.save_tree(io.load_tree(cached, phi0), phi_s_path)
  else:
    result = loop.fit(model, nnx.LoRAParam, train_iter(), spec, workdir / "fit", mesh=mesh,
                      progress=progress, desc="surrogate", replicate_batches=True, **fit_kwargs)
    if distributed.is_main():
      phi_s = _host(result.params)
      io.save_tree(phi_s, phi_s_path)
      if cached is not None:
        io.save_tree(phi_s, cached)
  distributed.barrier(f"jbat-surrogate-{workdir}")
  # Reload both from disk so a fresh run and a resumed run hold bitwise the same values.
  return Surrogate(graphdef, io.load_tree(phi0_path, phi0), io.load_tree(phi_s_path, phi0), rest)
