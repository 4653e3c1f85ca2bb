"""Scoring throughput: examples/s of the ALBAT scoring kernels against a plain forward pass.

  .venv/bin/python benchmarks/scoring_throughput.py --quick     # demo model only, < 3 min (2 CPUs)
  .venv/bin/python benchmarks/scoring_throughput.py             # demo + ~25M model, ~10 min (2 CPUs)

For each model (a GPT-2-like `CausalLM` with LoRA r=8, alpha=16 on the default targets) and one
batch of B random token sequences with random lengths (right padding, as `pad_batch` makes
them), it times, in examples/s (B / median seconds per call):

  forward    jitted per-example loss l(z_i; phi0) only                          (1F, the unit)
  align      -<grad l(z_i; phi0), delta> by one jvp over the batch              (~2F)
  loss_diff  l(z_i; phi0) - l(z_i; phi_s), two forwards                        (2F)
  cosine     vmap per-example gradients, dot with delta and norms               (~3F)
  less       vmap per-example gradients, Rademacher projection to d, cosine     (~3F + B|phi|d)
             with the packed matrix and the projected target made once (as score_pool does)
  less_rng   the same, regenerating the matrix from the key on every call (32 signs per word)
  grads      vmap per-example gradients alone (the tree with leading axis B)    (~3F)
  loop       B calls of one jitted batch-1 gradient (the LESS / DataInf pattern)

Every function is compiled first (warm-up call, not timed); then `--repeats` rounds are run,
each round calling every method once in a rotated round-robin order so that machine noise hits
all methods alike, with `jax.block_until_ready` after each call. The backbone weights are a jit
argument (not a closed-over constant), as in a streaming scorer.

Output: one table per model, then one JSON line per model (the last line is the last model):
  {"device": ..., "params": ..., "batch": ..., "examples_per_s": {...},
   "ratio_to_forward": {"align": ..., "loss_diff": ..., "cosine": ..., "less": ..., "loop": ...}}
with extra keys "model", "adapter_params", "vmap_over_loop" (grads / loop examples/s), and
"ratio_to_forward_best" / "ratio_to_forward_cpu" (from the fastest call and from process CPU
time: on a shared machine these move less with other processes' load than the median).
Targets on a CPU: align >= 0.45x forward; vmap per-example gradients faster than the loop.

Model FLOP utilisation: the FLOPs of one call of `forward`, `align` and `loss_diff` come from
XLA's cost analysis of the compiled program; the peak is measured on the same device as the
best time of a square matmul in the model's dtype (`--dtype`). MFU = FLOPs / seconds / peak,
reported per method ("mfu") with "matmul_peak_tflops" and "flops_per_call".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Run as a script from any directory: the repository root (parent of benchmarks/) is importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jbat import lora  # noqa: E402
from jbat.data.pipeline import pad_batch  # noqa: E402
from jbat.losses import lm_per_example_loss  # noqa: E402
from jbat.models.causal_lm import CausalLM, LMConfig  # noqa: E402
from jbat.scoring import kernels  # noqa: E402

METHODS = ("forward", "align", "loss_diff", "cosine", "less", "less_rng", "grads", "loop")

# name -> LMConfig (d_ff = 4 D, L = max_len). "demo" is configs/demo.py's model; "25m" has
# 7 x 12 D^2 (~22.0M) in its blocks plus an 8192 x 512 tied embedding (~4.2M): ~26.3M in all.
MODELS: dict[str, LMConfig] = {
    "demo": LMConfig.gpt2_like(1024, max_len=64, d_model=128, n_layers=4, n_heads=4),
    "25m": LMConfig.gpt2_like(8192, max_len=128, d_model=512, n_layers=7, n_heads=8),
    # GPT-2 small shape (12 x 768, vocab padded to 50304): ~124M parameters. For accelerators:
    #   benchmarks/scoring_throughput.py --models 125m --dtype bfloat16 --batch 64
    "125m": LMConfig.gpt2_like(50304, max_len=512, d_model=768, n_layers=12, n_heads=12),
}
DEFAULT_REPEATS = {"demo": 5, "25m": 3, "125m": 5}  # ~25 s and ~8 min per model on 2 CPUs.
LORA = lora.LoRAConfig(rank=8, alpha=16.0)


def random_batch(rng: np.random.Generator, cfg: LMConfig, batch_size: int) -> dict[str, jax.Array]:
  """B rows of random token ids with lengths ~ U[L/4, L] (+1 for the shifted target), padded.

  Uses `pad_batch`, so the keys are those of the real pipeline: tokens, targets, weights,
  positions, segment_ids (0 on padding) and valid (all True). The int64 "id" is dropped.
  """
  lengths = rng.integers(cfg.max_len // 4, cfg.max_len + 1, size=batch_size) + 1
  examples = [{"id": i, "ids": rng.integers(3, cfg.vocab_size, size=n).astype(np.int32)}
              for i, n in enumerate(lengths)]
  batch = pad_batch(examples, batch_size, cfg.max_len, pad_id=0)
  batch.pop("id")
  return {k: jnp.asarray(v) for k, v in batch.items()}


def build(cfg: LMConfig, seed: int) -> dict[str, Any]:
  """Model + LoRA, split into (graphdef, phi0, rest), and the scoring directions.

  delta ~ 1e-3 N(0, 1) per adapter entry, phi_s = phi0 + delta, target_grad ~ N(0, 1): the
  values do not change the cost, only shapes do.
  """
  model = CausalLM(cfg, rngs=nnx.Rngs(seed))
  lora.apply_lora(model, LORA, rngs=nnx.Rngs(seed + 1))
  counts = lora.count_params(model)
  graphdef, phi0, rest = lora.split(model)
  leaves, treedef = jax.tree.flatten(phi0)
  keys = jax.random.split(jax.random.key(seed + 2), 2 * len(leaves))
  noise = lambda k, x, s: s * jax.random.normal(k, x.shape, x.dtype)
  delta = jax.tree.unflatten(treedef, [noise(k, x, 1e-3) for k, x in zip(keys, leaves)])
  target = jax.tree.unflatten(treedef, [noise(k, x, 1.0)
                                        for k, x in zip(keys[len(leaves):], leaves)])
  return {"graphdef": graphdef, "phi0": phi0, "rest": rest, "delta": delta,
          "phi_s": kernels.tree_sub(phi0, jax.tree.map(jnp.negative, delta)),
          "target_grad": target, "counts": counts}


def make_methods(m: dict[str, Any], batch: dict[str, jax.Array], proj_dim: int,
                 seed: int) -> dict[str, Callable[[], Any]]:
  """name -> zero-argument callable running one jitted call on `batch` (returns device arrays).

  loss(rest, phi, batch) = lm_per_example_loss(merge(graphdef, phi, rest), batch) -> f32[B];
  each kernel gets `functools.partial(loss, rest)` inside its jit, so rest is a traced argument.
  """
  graphdef = m["graphdef"]

  def loss(rest, phi, b):
    return lm_per_example_loss(lora.merge(graphdef, phi, rest), b)

  def kernel_jit(kernel, **static):
    return jax.jit(lambda rest, *args: kernel(functools.partial(loss, rest), *args, **static))

  forward = jax.jit(loss)
  align = kernel_jit(kernels.align)
  loss_diff = kernel_jit(kernels.loss_diff)
  cosine = kernel_jit(kernels.cosine)
  grads = kernel_jit(kernels.per_example_grads)
  key = jax.random.key(seed + 3)
  # As stream.score_pool: the target is projected once per run (not timed), and the packed
  # Rademacher matrix is made once and passed as an argument (less) or regenerated (less_rng).
  words = jax.jit(kernels.rademacher_words, static_argnums=2)(key, m["phi_s"], proj_dim)
  target = jax.jit(kernels.project_target, static_argnums=2)(m["target_grad"], key, proj_dim,
                                                             words=words)
  less = jax.jit(lambda rest, phi, tg, b, k, w: kernels.less(
      functools.partial(loss, rest), phi, tg, b, key=k, proj_dim=proj_dim, words=w))
  # The LESS / DataInf pattern: one jitted batch-1 gradient, called once per example. Rows are
  # sliced before timing (a data loader would hand them over one by one).
  grad1 = jax.jit(jax.grad(lambda phi, rest, row: loss(rest, phi, row)[0]))
  rows = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(batch["tokens"].shape[0])]
  rest, phi0, delta = m["rest"], m["phi0"], m["delta"]
  return {
      "forward": lambda: forward(rest, phi0, batch),
      "align": lambda: align(rest, phi0, delta, batch),
      "loss_diff": lambda: loss_diff(rest, phi0, m["phi_s"], batch),
      "cosine": lambda: cosine(rest, phi0, delta, batch),
      "less": lambda: less(rest, m["phi_s"], target, batch, None, words),
      "less_rng": lambda: less(rest, m["phi_s"], target, batch, key, None),
      "grads": lambda: grads(rest, phi0, batch),
      "loop": lambda: [grad1(phi0, rest, row) for row in rows],
  }


def kernel_flops(m: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, float]:
  """FLOPs of one call of forward / align / loss_diff, from XLA's cost analysis."""
  graphdef = m["graphdef"]

  def loss(rest, phi, b):
    return lm_per_example_loss(lora.merge(graphdef, phi, rest), b)

  fns = {
      "forward": (loss, (m["rest"], m["phi0"], batch)),
      "align": (lambda rest, *a: kernels.align(functools.partial(loss, rest), *a),
                (m["rest"], m["phi0"], m["delta"], batch)),
      "loss_diff": (lambda rest, *a: kernels.loss_diff(functools.partial(loss, rest), *a),
                    (m["rest"], m["phi0"], m["phi_s"], batch)),
  }
  out = {}
  for name, (fn, args) in fns.items():
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = float((cost or {}).get("flops", float("nan")))
  return out


def matmul_peak(dtype: str, repeats: int = 5) -> float:
  """Measured FLOP/s of a square matmul in `dtype` on the default device (best of repeats)."""
  n = 1024 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def time_methods(methods: dict[str, Callable[[], Any]],
                 repeats: int) -> dict[str, dict[str, float]]:
  """Per method {"median", "best"} wall seconds and "cpu" (median process CPU seconds, all
  threads) per call: a warm-up (compile) call, then `repeats` round-robin rounds, round r
  starting at method r mod n. On a shared machine "best" and "cpu" are less affected by other
  processes than the median wall time."""
  for fn in methods.values():
    jax.block_until_ready(fn())
  names = list(methods)
  wall: dict[str, list[float]] = {n: [] for n in names}
  cpu: dict[str, list[float]] = {n: [] for n in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(methods[name]())
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {n: {"median": statistics.median(wall[n]), "best": min(wall[n]),
              "cpu": statistics.median(cpu[n])} for n in names}


def device_name() -> str:
  d = jax.devices()[0]
  cpus = os.cpu_count()
  host = f"{cpus}-core CPU ({platform.processor() or platform.machine()})"
  return host if d.platform == "cpu" else f"{d.device_kind} ({d.platform}) x{jax.device_count()}"


def run_model(name: str, batch_size: int, repeats: int, proj_dim: int, seed: int,
              dtype: str = "float32") -> dict:
  """Benchmark one model; returns the JSON record (see module docstring)."""
  cfg = dataclasses.replace(MODELS[name], dtype=dtype)
  m = build(cfg, seed)
  batch = random_batch(np.random.default_rng(seed), cfg, batch_size)
  t0 = time.perf_counter()
  stats = time_methods(make_methods(m, batch, proj_dim, seed), repeats)
  secs = {k: v["median"] for k, v in stats.items()}
  eps = {k: batch_size / s for k, s in secs.items()}
  ratio = {k: eps[k] / eps["forward"] for k in METHODS if k != "forward"}
  print(f"\n== model {name}: {m['counts']['total'] / 1e6:.2f}M params "
        f"({m['counts']['adapter']} adapter), batch {batch_size} x L={cfg.max_len}, "
        f"mean length {float(batch['weights'].sum(1).mean()):.1f}, proj_dim {proj_dim}, "
        f"{repeats} repeats, {time.perf_counter() - t0:.0f} s")
  print(f"{'method':<10} {'s/batch':>9} {'examples/s':>11} {'x forward':>10} "
        f"{'best s':>9} {'x fwd best':>10} {'cpu s':>9} {'x fwd cpu':>10}")
  fwd = stats["forward"]
  for k in METHODS:
    st = stats[k]
    print(f"{k:<10} {st['median']:>9.4f} {eps[k]:>11.1f} {eps[k] / eps['forward']:>10.3f} "
          f"{st['best']:>9.4f} {fwd['best'] / st['best']:>10.3f} "
          f"{st['cpu']:>9.4f} {fwd['cpu'] / st['cpu']:>10.3f}")
  print(f"vmap per-example grads / batch-1 loop: {eps['grads'] / eps['loop']:.2f}x (median), "
        f"{stats['loop']['best'] / stats['grads']['best']:.2f}x (best), "
        f"{stats['loop']['cpu'] / stats['grads']['cpu']:.2f}x (cpu)", flush=True)
  flops = kernel_flops(m, batch)
  peak = matmul_peak(dtype)
  mfu = {k: flops[k] / secs[k] / peak for k in flops}
  print(f"matmul peak {peak / 1e12:.2f} TFLOP/s ({dtype}); model FLOP utilisation: "
        + ", ".join(f"{k} {v:.1%} ({flops[k] / 1e9:.2f} GFLOP/call)" for k, v in mfu.items()),
        flush=True)
  return {"device": device_name(), "model": name, "dtype": dtype,
          "params": m["counts"]["total"],
          "flops_per_call": flops, "matmul_peak_tflops": round(peak / 1e12, 4),
          "mfu": {k: round(v, 4) for k, v in mfu.items()},
          "adapter_params": m["counts"]["adapter"], "batch": batch_size,
          "examples_per_s": {k: round(v, 2) for k, v in eps.items()},
          "ratio_to_forward": {k: round(v, 4) for k, v in ratio.items()},
          "vmap_over_loop": round(eps["grads"] / eps["loop"], 3),
          "ratio_to_forward_best": {k: round(fwd["best"] / stats[k]["best"], 4)
                                    for k in METHODS if k != "forward"},
          "ratio_to_forward_cpu": {k: round(fwd["cpu"] / stats[k]["cpu"], 4)
                                   for k in METHODS if k != "forward"}}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="demo model only (< 3 min on 2 CPUs)")
  p.add_argument("--models", default=None,
                 help=f"comma-separated subset of {sorted(MODELS)} (default: all, or demo "
                      "with --quick)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds per model, median taken (default: 5 demo, 3 for 25m)")
  p.add_argument("--proj-dim", type=int, default=1024, help="LESS projection dimension")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the model (parameters stay float32)")
  args = p.parse_args(argv)
  names = (args.models.split(",") if args.models
           else ["demo"] if args.quick else list(MODELS))
  for n in names:
    if n not in MODELS:
      p.error(f"--models: unknown model {n!r}, expected some of {sorted(MODELS)}")
  if args.batch <= 0 or (args.repeats is not None and args.repeats <= 0):
    p.error("--batch and --repeats must be positive")
  print(f"jax {jax.__version__}, device: {device_name()}")
  records = [run_model(n, args.batch, args.repeats or DEFAULT_REPEATS[n], args.proj_dim,
                       args.seed, args.dtype) for n in names]
  print()
  for rec in records:
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
