"""One straight-line training loop, used for backbone pretraining and for adapter training.

`fit` trains the parameters of `model` selected by a filter (`nnx.LoRAParam` for adapters,
`nnx.Param` for full pretraining) with optax AdamW (linear warmup + cosine decay, global-norm
clipping). The jitted step is a pure function of (trainable params, optimizer state, frozen
params, batch); batches are sharded over the mesh's `data` axis and parameters replicated, so
the same code runs on 1 or N devices. An orbax `CheckpointManager` saves trainable params,
optimizer state, RNG and the grain iterator state every `ckpt_every` steps; calling `fit` again
with the same workdir resumes from the latest checkpoint and reaches bitwise the same result.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jbat import distributed, io, losses
from jbat.errors import Diverged

MODEL_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Optimisation and bookkeeping settings of one training run."""
  steps: int
  lr: float
  warmup_steps: int = 0
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  eval_every: int = 0  # 0: evaluate only at the end.
  ckpt_every: int = 0  # 0: checkpoint only at the end.
  keep: int = 2
  log_every: int = 10
  seed: int = 0
  # Split each batch into this many micro-batches and average their gradients (one optimizer
  # step per batch): activation memory of B / grad_accum rows. Must divide the batch rows.
  grad_accum: int = 1
  # Early stopping: stop after this many evaluations in a row without a new best held-out loss
  # (0: never stop early; needs eval_batches).
  patience: int = 0


@dataclasses.dataclass
class FitResult:
  params: nnx.State  # Final trainable parameters.
  best_params: nnx.State | None  # Trainable parameters at the best evaluation (if eval_fn).
  best_step: int
  best_loss: float
  history: list[dict[str, Any]]  # Every record written to metrics.jsonl, in step order.
  stopped_step: int | None = None  # The step early stopping ended at (None: it did not).


def make_optimizer(spec: TrainSpec) -> optax.GradientTransformation:
  """AdamW on a warmup + cosine schedule, after global-norm clipping (clip_norm 0: none).

  Cached on the optimisation settings, so runs that share them (arms, seeds) get the same
  object and so reuse the compiled training step.
  """
  return _optimizer(spec.steps, spec.lr, spec.warmup_steps, spec.weight_decay, spec.clip_norm)


@functools.lru_cache(maxsize=32)
def _optimizer(steps: int, lr: float, warmup_steps: int, weight_decay: float,
               clip_norm: float) -> optax.GradientTransformation:
  schedule = _schedule(steps, lr, warmup_steps)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, weight_decay=weight_decay))
  return optax.chain(*parts)


LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], jax.Array]
EvalFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def lm_train_loss(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """The default training loss: weighted mean token NLL of a causal LM (`rng` unused)."""
  del rng
  return losses.lm_loss(model, batch)


def lm_eval_sums(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The default evaluation: (sum of weighted token NLL, sum of weights) of one batch (over
  vocabulary chunks when the model's cfg.vocab_chunk is set, see jbat.losses)."""
  nll = losses.lm_token_nll(model, batch)
  return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "loss_fn", "grad_accum"))
def train_step(params: nnx.State, opt_state: Any, frozen: nnx.State, rng: jax.Array,
               batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_fn: LossFn = lm_train_loss,
               grad_accum: int = 1):
  """One optimizer step on the trainable `params` (a pure function; compiled once per shape).

  `rng` is raw key data; the loss gets a fresh key split from it and the other half is
  returned for the next step, so the key sequence is a function of the seed and the step.
  With grad_accum = A > 1 the B rows are split into A micro-batches (row i goes to micro-batch
  i mod A, so each one keeps its share of every device's rows) scanned one at a time; loss and
  gradient are the means over micro-batches, the full-batch values when every micro-batch
  carries the same loss weight.
  """
  rng, step_key = jax.random.split(jax.random.wrap_key_data(rng))

  def objective(p, b, key):
    return loss_fn(nnx.merge(graphdef, p, frozen), b, key)

  if grad_accum == 1:
    loss, grads = jax.value_and_grad(objective)(params, batch, step_key)
  else:
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, xs):
      b, key = xs
      value, g = jax.value_and_grad(objective)(params, b, key)
      return jax.tree.map(jnp.add, carry, (value, g)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                    (micro, jax.random.split(step_key, grad_accum)))
    loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return params, opt_state, jax.random.key_data(rng), metrics


@jax.jit
def first_bad_step(first: jax.Array, metrics: dict[str, jax.Array], step: jax.Array
                   ) -> jax.Array:
  """`first` if it is set (> 0), else `step` if the step's loss or gradient norm is not finite,
  else 0: the first diverged step, tracked on the device without waiting for the step."""
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  return jnp.where(first > 0, first, jnp.where(ok, 0, step)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "eval_fn"))
def eval_sums(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *,
              graphdef: nnx.GraphDef, eval_fn: EvalFn = lm_eval_sums
              ) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of one held-out batch under `eval_fn` (default: weighted token NLL)."""
  return eval_fn(nnx.merge(graphdef, params, frozen), batch)


def data_mesh(devices: list | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices with a single `data` axis."""
  return distributed.make_mesh(1, devices)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                keys: Sequence[str] = MODEL_KEYS) -> dict[str, jax.Array]:
  """Places the `keys` arrays of a host-local numpy batch on the mesh, split over `data`."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in keys if k in batch}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """The pytree (same value on every process) replicated on every device of the mesh."""
  return distributed.put_global(tree, mesh)


def make_eval_fn(graphdef: nnx.GraphDef, frozen: nnx.State, batches: Callable[[], Iterator],
                 mesh: jax.sharding.Mesh, *, eval_fn: EvalFn = lm_eval_sums,
                 batch_keys: Sequence[str] = MODEL_KEYS) -> Callable[[nnx.State], float]:
  """Returns params -> sum of `eval_fn` sums / sum of its counts over one pass of `batches()`
  (by default the mean token NLL in nats/token)."""

  def evaluate(params: nnx.State) -> float:
    total, count = 0.0, 0.0
    for batch in batches():
      s, c = eval_sums(params, frozen, shard_batch(batch, mesh, batch_keys), graphdef=graphdef,
                       eval_fn=eval_fn)
      total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)

  return evaluate


def fit(model: nnx.Module, wrt: Any, train_iter: Any, spec: TrainSpec, workdir: pathlib.Path,
        *, eval_batches: Callable[[], Iterator] | None = None,
        mesh: jax.sharding.Mesh | None = None, progress: bool = True,
        desc: str = "train", loss_fn: LossFn = lm_train_loss, eval_fn: EvalFn = lm_eval_sums,
        batch_keys: Sequence[str] = MODEL_KEYS, replicate_batches: bool = False,
        until: int | None = None) -> FitResult:
  """Trains the `wrt` parameters of `model` for `spec.steps` steps; resumes from `workdir`.

  Args:
    model: the model; its `wrt` parameters are the trained ones, everything else is frozen.
    wrt: an nnx filter (`nnx.LoRAParam` for adapters, `nnx.Param` for everything).
    train_iter: an endless grain iterator of numpy batches with `get_state`/`set_state`.
    spec: optimisation settings.
    workdir: holds `checkpoints/`, `metrics.jsonl` and `best.safetensors`.
    eval_batches: a callable returning one pass of held-out batches; evaluated at step 0, every
      `eval_every` steps and at the end; the best trainable params are kept.
    loss_fn: (model, batch, rng key) -> scalar training loss; a module-level function (it is a
      static jit argument). Default: the causal-LM token NLL.
    eval_fn: (model, batch) -> (sum, count); the evaluation loss is sum / count over the pass.
    batch_keys: the arrays of each batch placed on the devices (split over `data`).
    replicate_batches: every device computes the whole batch instead of its share (each process
      then passes the whole global batch). For tiny training sets such as the surrogate's: no
      cross-device gradient sum, so the result is bitwise the same however the devices are
      split into processes.
    until: stop after this step (checkpointed) instead of `spec.steps`; the schedule is still
      that of `spec.steps`. A later call (say with another `train_iter`, as BAT re-selection
      does) resumes there. A run already past `until` is restored and returned as it is.
  Early stopping (spec.patience > 0): after spec.patience evaluations in a row without a new
  best held-out loss, training stops at that step (checkpointed, recorded as "stopped_step" in
  the checkpoint's meta and in metrics.jsonl); a later call (a resume, a later `until`)
  returns at once. Only the held-out loss of `eval_batches` decides.
  Multi-process: call on every process with the same arguments; only process 0 writes
  metrics.jsonl and best.safetensors, orbax coordinates the checkpoint writes.
  Returns:
    FitResult with the final and best parameters and the metric history.
  Raises:
    Diverged: a step's loss or gradient norm (or a held-out loss) is not finite. The first bad
      step is tracked on the device and checked before every log record, evaluation and
      checkpoint, so nothing non-finite is logged, kept as best or checkpointed: the folder
      keeps the last finite checkpoint (a rerun resumes there and diverges the same way).
  """
  mesh = mesh or data_mesh()
  last = spec.steps if until is None else until
  if not 0 <= last <= spec.steps:
    raise ValueError(f"fit: until={until} must be in 0..spec.steps ({spec.steps})")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  graphdef, params, frozen = nnx.split(model, wrt, ...)
  tx = make_optimizer(spec)
  params, frozen = distributed.place_params(params, mesh), distributed.place_params(frozen, mesh)
  # Placed like the parameters (moments by the same shape rule, the step count replicated):
  # jit leaves these constant outputs uncommitted on one device, and a checkpoint restored
  # onto such a target would stay there, which a multi-device step then refuses.
  opt_state = distributed.place_params(jax.jit(tx.init)(params), mesh)
  # Replicated like the step's output, so the first and later steps share one compilation.
  rng = replicate(np.asarray(jax.random.key_data(jax.random.key(spec.seed))), mesh)

  mngr = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=spec.keep, enable_async_checkpointing=False,
                                           create=True))
  meta = {"best_loss": float("inf"), "best_step": -1, "bad_evals": 0, "stopped_step": None}
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    restored = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state, "rng": rng}),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    # Restored with the shardings of the targets above.
    params, opt_state = restored.state["params"], restored.state["opt_state"]
    rng = replicate(np.asarray(distributed.host_array(restored.state["rng"])), mesh)
    train_iter.set_state(restored.data)
    meta = {"bad_evals": 0, "stopped_step": None, **restored.meta}
  metrics_path = workdir / "metrics.jsonl"
  # Records past the restored checkpoint came from an interrupted run: they are written again.
  keep = lambda r: 0 < start and r["step"] <= start  # noqa: E731
  history = [r for r in io.read_jsonl(metrics_path) if keep(r)]
  if distributed.is_main():
    io.truncate_jsonl(metrics_path, keep=keep)
  put = functools.partial(replicate, mesh=mesh) if replicate_batches else (
      lambda b: shard_batch(b, mesh, batch_keys))
  best_path = workdir / "best.safetensors"

  evaluate = (make_eval_fn(graphdef, frozen, eval_batches, mesh, eval_fn=eval_fn,
                           batch_keys=batch_keys) if eval_batches else None)
  schedule_lr = make_optimizer_schedule(spec)

  def record(rec: dict[str, Any]) -> None:
    history.append(rec)
    if distributed.is_main():
      io.append_jsonl(metrics_path, rec)

  def maybe_eval(step: int, params) -> None:
    if evaluate is None:
      return
    loss = evaluate(params)
    if not np.isfinite(loss):
      raise Diverged(step, "held-out loss", desc, spec.lr)
    record({"step": step, "eval_loss": loss})
    if loss < meta["best_loss"]:
      meta.update(best_loss=loss, best_step=step, bad_evals=0)
      if distributed.is_main():
        io.save_tree(params, best_path)
    else:
      meta["bad_evals"] = int(meta.get("bad_evals", 0)) + 1

  if start == 0:
    maybe_eval(0, params)
  bar = tqdm(total=spec.steps, initial=start, desc=desc, dynamic_ncols=True,
             disable=not progress or not distributed.is_main())
  t0, n_seen = time.perf_counter(), 0
  bad = np.int32(0)  # The first non-finite step so far (0: none), a device value.

  def check_finite() -> None:  # Waits for the steps dispatched so far.
    first = int(bad)
    if first:
      raise Diverged(first, "loss or gradient norm", desc, spec.lr)

  if meta.get("stopped_step") is not None:
    last = start  # Stopped early before: nothing left to train.
  try:
    for step in range(start + 1, last + 1):
      batch = next(train_iter)
      first = next(k for k in batch_keys if k in batch)
      n_seen += int(np.sum(batch["valid"])) if "valid" in batch else len(batch[first])
      params, opt_state, rng, m = train_step(
          params, opt_state, frozen, rng, put({k: batch[k] for k in batch_keys if k in batch}),
          graphdef=graphdef, tx=tx, loss_fn=loss_fn, grad_accum=spec.grad_accum)
      bad = first_bad_step(bad, m, np.int32(step))
      do_log = step % spec.log_every == 0 or step == spec.steps
      do_eval = (spec.eval_every and step % spec.eval_every == 0) or step == spec.steps
      do_ckpt = (spec.ckpt_every and step % spec.ckpt_every == 0) or step == last
      if do_log or do_eval or do_ckpt:
        check_finite()
      if do_log:
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])  # Waits for the step.
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss, "grad_norm": grad_norm,
               "lr": float(schedule_lr(step - 1)), "examples_per_s": n_seen / max(dt, 1e-9)}
        record(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ex_s=f"{rec['examples_per_s']:.0f}")
        t0, n_seen = time.perf_counter(), 0
      if do_eval:
        maybe_eval(step, params)
        if spec.patience and evaluate is not None and meta["bad_evals"] >= spec.patience \
            and step < spec.steps:
          meta["stopped_step"] = step
          record({"step": step, "stopped_early": True, "patience": spec.patience,
                  "best_step": meta["best_step"]})
          do_ckpt = True
      if do_ckpt:
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "rng": rng}),
            data=ocp.args.JsonSave(train_iter.get_state()),
            meta=ocp.args.JsonSave(dict(meta))), force=True)
      bar.update(1)
      if meta.get("stopped_step") is not None:
        break
  finally:
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
  distributed.barrier(f"jbat-fit-{workdir.name}-{last}")  # best.safetensors is written.
  best = io.load_tree(best_path, params) if evaluate is not None and best_path.exists() else None
  return FitResult(params=params, best_params=best, best_step=meta["best_step"],
                   best_loss=meta["best_loss"], history=history,
                   stopped_step=meta.get("stopped_step"))


def make_optimizer_schedule(spec: TrainSpec) -> optax.Schedule:
  """The learning-rate schedule `make_optimizer` uses (for logging)."""
  return _schedule(spec.steps, spec.lr, spec.warmup_steps)


def _schedule(steps: int, lr: float, warmup_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(steps, warmup_steps + 1), end_value=lr * 0.1)
