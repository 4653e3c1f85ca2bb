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

Pretrained models (`--pretrained PATH` = an HF folder or a .gguf file, `--smollm2` = the
SmolLM2-135M-Instruct GGUF fetched by `jbat.models.hub_free`; a GGUF is converted once to an
HF folder `<file>.hf/` next to it, which jbat and transformers then both load):

  .venv/bin/python benchmarks/scoring_throughput.py --smollm2 --seq-lens 128 --peers
  .venv/bin/python benchmarks/scoring_throughput.py --smollm2 --seq-lens 512 --memory-only

times forward, align, loss_diff, rel_loss_diff and less (d = --proj-dim, default 8192 as
LESS) with the vocabulary-chunked loss (`--vocab-chunk`, default 8192; 0 = full logits) at each
sequence length and dtype (`--dtype float32,bfloat16`), in examples/s and tokens/s (non-padding
tokens), with XLA's temporary-buffer size per compiled method. `--peers` adds, in the same
alternated rounds and threads, the same weights in transformers + peft: torch_forward,
less_loop (LESS as it runs on a CPU: batch-1 loop of LoRA gradients, TRAK's BasicProjector
with LESS's settings, cosine), less_loop_packed (the same loop, a cheaper packed-sign
projector) and trak_vmap (TRAK: torch.func.vmap(grad) + the packed projection); the JSON line gets
"vs_peers" = jbat align examples/s / the peer's. `--memory` (or `--memory-only`) measures the
peak RSS of each method in a fresh subprocess (load the model, compile, one call; "load" is
the same child without a call). One JSON line per (length, dtype).

Model FLOP utilisation: the FLOPs of one call of `forward`, `align` and `loss_diff` come from
XLA's cost analysis of the compiled program; the peak is measured on the same device as the
best time of a square matmul in the model's dtype (`--dtype`). MFU = FLOPs / seconds / peak,
reported per method ("mfu") with "matmul_peak_tflops" and "flops_per_call". With a pretrained
model the FLOPs come from the model config instead (`forward_flops_per_example`, align = 2F,
less = 3F + its projection) and the line "matmul peak ... MFU ..." follows each table.
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


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` timed calls of `call` (which must return only when done)."""
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_peak(dtype: str, repeats: int = 5) -> float:
  """Measured FLOP/s of a square matmul in `dtype` on the default device (best of repeats)."""
  n = 1024 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  return 2.0 * n ** 3 / best_seconds(lambda: jax.block_until_ready(f(a, a)), repeats)


def linear_shapes(cfg: LMConfig, tokens: int) -> dict[str, tuple[int, int, int, int]]:
  """name -> (m, k, n, calls per forward) of the model's weight matmuls on `tokens` rows: the
  attention projections and the MLP per layer (x n_layers), and the LM head once."""
  d, dh, h, kv = cfg.d_model, cfg.dh, cfg.n_heads, cfg.kv_heads
  mlp = {"gate/up": (tokens, d, cfg.d_ff, 2 * cfg.n_layers)} if cfg.mlp == "swiglu" else {
      "fc1": (tokens, d, cfg.d_ff, cfg.n_layers)}
  return {"q": (tokens, d, h * dh, cfg.n_layers), "k/v": (tokens, d, kv * dh, 2 * cfg.n_layers),
          "o": (tokens, h * dh, d, cfg.n_layers), **mlp,
          "down": (tokens, cfg.d_ff, d, cfg.n_layers),
          "lm_head": (tokens, d, cfg.vocab_size, 1)}


def matmul_vs_torch(cfg: LMConfig, tokens: int, repeats: int = 5) -> dict[str, Any]:
  """The model's weight matmuls (`linear_shapes`) timed alone, float32, in XLA (jitted) and in
  torch on the same threads: best of `repeats` each. Says how much of a forward's
  gap to PyTorch is the matmul library's speed rather than the model code."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  f = jax.jit(lambda x, y: x @ y)
  rows, totals = {}, {"jax": 0.0, "torch": 0.0}
  print(f"{'matmul':<8} {'m x k x n':>20} {'calls':>6} {'jax ms':>8} {'torch ms':>9} "
        f"{'jax/torch':>10}")
  for name, (m, k, n, calls) in linear_shapes(cfg, tokens).items():
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    ta, tb = torch.ones(m, k), torch.ones(k, n)
    jax.block_until_ready(f(a, b))
    ta @ tb  # pylint: disable=pointless-statement
    # Each library's calls back to back, after a pause: torch's OpenMP workers spin for a
    # while after each call and would slow an XLA call that follows at once.
    time.sleep(0.5)
    best = {"jax": best_seconds(lambda: jax.block_until_ready(f(a, b)), repeats),
            "torch": best_seconds(lambda: ta @ tb, repeats)}
    rows[name] = {"shape": [m, k, n], "calls": calls, "jax_ms": round(1e3 * best["jax"], 2),
                  "torch_ms": round(1e3 * best["torch"], 2)}
    for lib in totals:
      totals[lib] += calls * best[lib]
    print(f"{name:<8} {f'{m} x {k} x {n}':>20} {calls:>6} {1e3 * best['jax']:>8.2f} "
          f"{1e3 * best['torch']:>9.2f} {best['jax'] / best['torch']:>10.2f}")
  ratio = totals["torch"] / totals["jax"]
  print(f"all weight matmuls of one forward: jax {totals['jax']:.2f} s, torch "
        f"{totals['torch']:.2f} s; XLA's speed / torch's = {ratio:.2f}", flush=True)
  return {"tokens": tokens, "matmuls": rows, "jax_s": round(totals["jax"], 3),
          "torch_s": round(totals["torch"], 3), "xla_vs_torch_speed": round(ratio, 3)}


def time_methods(methods: dict[str, Callable[[], Any]], repeats: int,
                 no_warmup: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
  """Per method {"median", "best"} wall seconds and "cpu" (median process CPU seconds, all
  threads) per call: a warm-up (compile) call (except for the methods in `no_warmup`), then
  `repeats` round-robin rounds, round r starting at method r mod n. On a shared machine "best"
  and "cpu" are less affected by other processes than the median wall time."""
  for name, fn in methods.items():
    if name not in no_warmup:
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



# ============================================================================= real models
# `--pretrained PATH` / `--smollm2`: a pretrained checkpoint (HF folder or .gguf) at several
# sequence lengths and dtypes, the vocabulary-chunked loss, peak memory per method, and (with
# `--peers`) the same model in transformers + peft on the same token batches.

PRETRAINED_METHODS = ("forward", "align", "loss_diff", "rel_loss_diff", "less")
PEER_METHODS = ("torch_forward", "less_loop", "less_loop_packed", "trak_vmap")
# LESS's gradient collection (princeton-nlp/LESS, collect_grad_reps) projects 16 gradients at a
# time with TRAK's projector of 128-column blocks; without a CUDA projector it is TRAK's
# BasicProjector (`trak_basic_project`).
LESS_PROJECTOR_BATCH = 16
LESS_BLOCK_COLUMNS = 128
# Peers timed without a warm-up call: minutes per call, nothing to compile (torch is eager).
NO_WARMUP = ("less_loop",)
# LoRA targets of `lora.DEFAULT_TARGETS` as peft module names (the Llama family).
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "fc1", "fc2"]


def hf_folder(path: str) -> str:
  """`path` if it is an HF folder; for a .gguf file, an HF folder converted from it once with
  `hf_io.save_causal_lm` (float32 safetensors, de-quantized) and cached next to the file as
  `<name>.hf/`, so that jbat children and transformers load the very same weights fast."""
  from jbat.models import hf_io  # pylint: disable=import-outside-toplevel
  if not path.endswith(".gguf"):
    return path
  out = path[:-len(".gguf")] + ".hf"
  if not os.path.isfile(os.path.join(out, "model.safetensors")):
    t0 = time.perf_counter()
    model, tokenizer = hf_io.load_causal_lm(path, "float32")
    hf_io.save_causal_lm(model, tokenizer, out)
    print(f"converted {path} -> {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
  return out


def load_pretrained(folder: str, dtype: str, seed: int) -> tuple[dict[str, Any], LMConfig]:
  """The jbat model of `folder` with LoRA (r=8, alpha=16, default targets), split as `build`
  does, with the same kind of random delta / phi_s / target_grad."""
  from jbat.models import hf_io  # pylint: disable=import-outside-toplevel
  model, _ = hf_io.load_causal_lm(folder, dtype)
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
          "phi_s": jax.tree.map(jnp.add, phi0, delta),
          "target_grad": target, "counts": counts}, model.cfg


def jbat_methods(m: dict[str, Any], batch: dict[str, jax.Array], proj_dim: int, seed: int,
                 vocab_chunk: int | None,
                 only: tuple[str, ...] = PRETRAINED_METHODS) -> dict[str, tuple[Callable, tuple]]:
  """name -> (jitted function, arguments) for the PRETRAINED_METHODS in `only`.

  `less` regenerates the Rademacher blocks from the key on every call (the packed matrix of a
  2.4M-entry adapter at d=8192 would take 2.5 GB, over `stream.score_pool`'s 256 MB limit for
  storing it); its target is projected once, outside the timing.
  """
  graphdef = m["graphdef"]

  def loss(rest, phi, b):
    return lm_per_example_loss(lora.merge(graphdef, phi, rest), b, vocab_chunk=vocab_chunk)

  def rel_loss_diff(rest, phi0, phi_s, b):  # as stream's rel_loss_diff kernel
    l0, ls = loss(rest, phi0, b), loss(rest, phi_s, b)
    ok = b["valid"] & (l0 > 0)
    return jnp.where(ok, (l0 - ls) / jnp.where(ok, l0, 1.0), 0.0)

  rest, phi0, phi_s, delta = m["rest"], m["phi0"], m["phi_s"], m["delta"]
  key = jax.random.key(seed + 3)
  out = {
      "forward": (jax.jit(loss), (rest, phi0, batch)),
      "align": (jax.jit(lambda r, *a: kernels.align(functools.partial(loss, r), *a)),
                (rest, phi0, delta, batch)),
      "loss_diff": (jax.jit(lambda r, *a: kernels.loss_diff(functools.partial(loss, r), *a)),
                    (rest, phi0, phi_s, batch)),
      "rel_loss_diff": (jax.jit(rel_loss_diff), (rest, phi0, phi_s, batch)),
  }
  if "less" in only:
    target = jax.jit(kernels.project_target, static_argnums=2)(m["target_grad"], key, proj_dim)
    out["less"] = (jax.jit(lambda r, p, t, b, k: kernels.less(
        functools.partial(loss, r), p, t, b, key=k, proj_dim=proj_dim)),
        (rest, phi_s, target, batch, key))
  return {k: v for k, v in out.items() if k in only}


# FLOPs of one method call in units of the forward's F (model FLOPs, not the work XLA does):
# the jvp of `align` carries a tangent through every matmul (2F), `loss_diff` and
# `rel_loss_diff` are two forwards, `less` is per-example gradients (3F) plus its projection.
METHOD_F = {"forward": 1.0, "align": 2.0, "loss_diff": 2.0, "rel_loss_diff": 2.0, "less": 3.0,
            "torch_forward": 1.0}


def forward_flops_per_example(cfg: LMConfig, seq_len: int) -> float:
  """Model FLOPs of one forward of one length-`seq_len` sequence, from the config alone:
  2 x (matmul weights per token: q/k/v/o, the MLP, the LM head) x seq_len, plus the attention
  products QK^T and AV, 4 x seq_len^2 x n_heads x head_dim per layer (no causal discount, as
  PaLM's MFU). LoRA's own r-dim products are left out (under 1% at r=8)."""
  d, dh, h, kv = cfg.d_model, cfg.dh, cfg.n_heads, cfg.kv_heads
  attn = d * h * dh + 2 * d * kv * dh + h * dh * d
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
  per_token = 2.0 * (cfg.n_layers * (attn + mlp) + d * cfg.vocab_size)
  return per_token * seq_len + cfg.n_layers * 4.0 * seq_len ** 2 * h * dh


def method_flops(cfg: LMConfig, seq_len: int, batch_size: int, adapter_params: int,
                 proj_dim: int) -> dict[str, float]:
  """name -> model FLOPs of one call on a padded batch (METHOD_F x the forward's), `less`
  with its B x |phi| x d projection."""
  f = forward_flops_per_example(cfg, seq_len) * batch_size
  out = {k: v * f for k, v in METHOD_F.items()}
  out["less"] += 2.0 * batch_size * adapter_params * proj_dim
  return out


def compile_with_memory(fn: Callable, args: tuple) -> tuple[Callable, dict[str, float]]:
  """(the compiled call of fn(*args), XLA's accounting of it: memory_analysis temporaries and
  arguments in MB). The temporaries are what a method adds on top of the weights and batch."""
  compiled = fn.lower(*args).compile()
  ma = compiled.memory_analysis()
  mb = lambda n: round(float(n) / 2 ** 20, 1)
  return compiled, {"temp": mb(getattr(ma, "temp_size_in_bytes", float("nan"))),
                    "args": mb(getattr(ma, "argument_size_in_bytes", float("nan")))}


# ----------------------------------------------------------------------------- peers (torch)


def trak_basic_project(grads, d: int, seed: int, block: int = LESS_BLOCK_COLUMNS):
  """[B, n] float32 torch gradients -> [B, d] as TRAK's CPU projector (`BasicProjector`,
  Rademacher), which LESS falls back to without its CUDA kernel: the d output columns in
  blocks of `block` (LESS sets 128); each block's whole n x block sign matrix drawn from its
  own seeded torch.Generator by one `bernoulli_(0.5)` per entry, mapped to +-1, multiplied in.
  Unscaled, as TRAK's (cosines do not depend on the scale)."""
  import torch  # pylint: disable=import-outside-toplevel
  b, n = grads.shape
  out = torch.zeros(b, d, dtype=torch.float32)
  mat = torch.empty(n, min(block, d), dtype=torch.float32)
  gen = torch.Generator()
  for j, start in enumerate(range(0, d, block)):
    cols = min(block, d - start)
    gen.manual_seed(seed + 1000 * j)
    mat.bernoulli_(0.5, generator=gen).mul_(2.0).sub_(1.0)
    out[:, start:start + cols] = grads.to(torch.float32) @ mat[:, :cols]
  return out


def torch_project(grads, d: int, seed: int, block: int = 4096):
  """[B, n] float32 torch gradients -> [B, d]: a Rademacher projection generated block by
  block, `block` parameter rows at a time, each block drawn from its own seeded
  torch.Generator, so the n x d matrix is never held. The signs are packed (as jbat's): 64 per
  random int64 word (`torch.randint`), unpacked a byte at a time by a 256 x 8 table lookup
  (`embedding`) into +-1/sqrt(d); about 6x faster here than TRAK's `trak_basic_project` (one
  `bernoulli_` draw per entry), so the peers using it get a cheaper projector than LESS's."""
  import torch  # pylint: disable=import-outside-toplevel
  b, n = grads.shape
  out = torch.zeros(b, d, dtype=torch.float32)
  scale = 1.0 / float(np.sqrt(d))
  table = torch.tensor([[-scale if (v >> k) & 1 else scale for k in range(8)]
                        for v in range(256)], dtype=torch.float32)
  for j, start in enumerate(range(0, n, block)):
    rows = min(block, n - start)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + j)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, (rows, -(-d // 64)), generator=gen,
                          dtype=torch.int64)
    signs = torch.nn.functional.embedding(words.view(torch.uint8).to(torch.int32), table)
    out.addmm_(grads[:, start:start + rows].to(torch.float32), signs.reshape(rows, -1)[:, :d])
  return out


def torch_peers(folder: str, dtype: str, batch: dict[str, jax.Array], proj_dim: int,
                seed: int) -> dict[str, Callable[[], Any]]:
  """The same checkpoint in transformers + peft (LoRA r=8, alpha=16, dropout 0, the same
  targets), on the same token batch:

    torch_forward     no_grad forward of the padded batch, per-example mean NLL (as `forward`)
    less_loop         LESS as it runs on a CPU: a batch-1 loop, each example unpadded,
                      loss.backward(), the LoRA gradients flattened; then the gradients
                      projected to proj_dim by TRAK's BasicProjector (`trak_basic_project`),
                      LESS_PROJECTOR_BATCH of them per projector call as LESS does, and the
                      cosine to the projected target gradient
    less_loop_packed  the same loop with the cheaper packed projector (`torch_project`) over
                      the whole batch at once: a stronger peer than LESS itself
    trak_vmap         TRAK: torch.func.vmap(grad(loss)) over the rows (LoRA parameters as the
                      functional_call arguments), then the packed projection and cosine

  Right padding and a causal mask mean a padded row's real positions never see its padding,
  so the padded rows need no attention mask (padded positions have weight 0).
  """
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=tdt,
                                                           local_files_only=True)
  targets = sorted({t for t in PEFT_TARGETS
                    if any(n.endswith("." + t) for n, _ in base.named_modules())})
  model = peft.get_peft_model(base, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                    lora_dropout=0.0, target_modules=targets))
  model.eval()
  names = [n for n, p in model.named_parameters() if p.requires_grad]
  params = dict(model.named_parameters())
  n_lora = sum(params[n].numel() for n in names)
  tokens = torch.from_numpy(np.asarray(batch["tokens"]).astype(np.int64))
  tgts = torch.from_numpy(np.asarray(batch["targets"]).astype(np.int64))
  weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
  lengths = [int(n) for n in np.asarray(batch["segment_ids"] > 0).sum(1)]
  gen = torch.Generator().manual_seed(seed + 4)
  target_grad = torch.randn(1, n_lora, generator=gen)
  target = torch_project(target_grad, proj_dim, seed)[0]

  def nll(logits, tg, w):  # [b, T, V], [b, T], [b, T] -> [b] weighted mean NLL (float32)
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = -logp.gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    return (w * tok).sum(-1) / w.sum(-1).clamp_min(1e-9)

  def cosine(projected, tgt=target):
    return projected @ tgt / (projected.norm(dim=1) * tgt.norm()).clamp_min(1e-12)

  def forward():
    with torch.no_grad():
      return nll(model(input_ids=tokens).logits, tgts, weights)

  def loop_grads():
    rows = []
    for i, n in enumerate(lengths):
      model.zero_grad(set_to_none=True)
      out = model(input_ids=tokens[i:i + 1, :n]).logits
      nll(out, tgts[i:i + 1, :n], weights[i:i + 1, :n])[0].backward()
      rows.append(torch.cat([params[k].grad.reshape(-1).float() for k in names]))
    return torch.stack(rows)

  def less_loop():
    # The target gradient rides along as one more row of each projector call: projecting it
    # alone first would be a second (untimed) pass of ~d x n bernoulli draws.
    g, out = loop_grads(), []
    for i in range(0, g.shape[0], LESS_PROJECTOR_BATCH):
      p = trak_basic_project(torch.cat([g[i:i + LESS_PROJECTOR_BATCH], target_grad]), proj_dim,
                             seed)
      out.append(cosine(p[:-1], p[-1]))
    return torch.cat(out)

  def less_loop_packed():
    return cosine(torch_project(loop_grads(), proj_dim, seed))

  lora_params = {k: params[k].detach() for k in names}

  def row_loss(p, ids, tg, w):
    out = torch.func.functional_call(model, p, args=(), kwargs={"input_ids": ids[None]})
    return nll(out.logits, tg[None], w[None])[0]

  vgrad = torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0, 0))

  def trak_vmap():
    g = vgrad(lora_params, tokens, tgts, weights)
    flat = torch.cat([g[k].reshape(g[k].shape[0], -1).float() for k in names], dim=1)
    return cosine(torch_project(flat, proj_dim, seed))

  torch_peers.adapter_params = n_lora
  return {"torch_forward": forward, "less_loop": less_loop,
          "less_loop_packed": less_loop_packed, "trak_vmap": trak_vmap}


# ----------------------------------------------------------------------------- memory children

MEMORY_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[0]] + sys.argv[2:]
import scoring_throughput as st
print(json.dumps(st.memory_child(sys.argv[1:])))
"""


def memory_child(argv: list[str]) -> dict:
  """In a fresh process: load the model, build the batch, compile and run `method` once;
  returns {"method", "peak_rss_mb"} (ru_maxrss: the high-water mark of the whole process,
  weights, compilation and the call included). method "load" stops before compiling."""
  import resource  # pylint: disable=import-outside-toplevel
  folder, dtype, seq_len, batch_size, method, proj_dim, seed, chunk = argv
  vocab_chunk = int(chunk) or None
  m, cfg = load_pretrained(folder, dtype, int(seed))
  cfg = dataclasses.replace(cfg, max_len=int(seq_len))
  batch = random_batch(np.random.default_rng(int(seed)), cfg, int(batch_size))
  if method in PEER_METHODS:
    del m
    fn = torch_peers(folder, dtype, batch, int(proj_dim), int(seed))[method]
    fn()
  elif method != "load":
    fn, args = jbat_methods(m, batch, int(proj_dim), int(seed), vocab_chunk, (method,))[method]
    jax.block_until_ready(fn(*args))
  return {"method": method, "peak_rss_mb": round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def peak_rss(folder: str, dtype: str, seq_len: int, batch_size: int, methods: list[str],
             proj_dim: int, seed: int, vocab_chunk: int | None) -> dict[str, float]:
  """method -> peak RSS (MB) of a fresh subprocess that loads the model and runs that method
  once (see `memory_child`); "load" is the baseline (model + batch, nothing compiled)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(here)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  out = {}
  for method in ["load"] + methods:
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, here, folder, dtype,
                          str(seq_len), str(batch_size), method, str(proj_dim), str(seed),
                          str(vocab_chunk or 0)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
      raise RuntimeError(f"memory child {method} failed:\n{res.stderr[-2000:]}")
    out[method] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    print(f"  peak RSS {method:<14} {out[method]:>9.1f} MB", flush=True)
  return out


def run_pretrained(folder: str, name: str, seq_len: int, dtype: str, batch_size: int,
                   repeats: int, proj_dim: int, seed: int, vocab_chunk: int | None,
                   peers: bool, memory: bool, methods: tuple[str, ...]) -> dict:
  """One (sequence length, dtype) configuration of a pretrained model; the JSON record."""
  m, cfg = load_pretrained(folder, dtype, seed)
  cfg = dataclasses.replace(cfg, max_len=seq_len)
  batch = random_batch(np.random.default_rng(seed), cfg, batch_size)
  real_tokens = int(np.asarray(batch["segment_ids"] > 0).sum())
  jm = jbat_methods(m, batch, proj_dim, seed, vocab_chunk, methods)
  calls, xla_mem = {}, {}
  for k, (fn, args) in jm.items():  # Compiled once, ahead of time; timed as compiled.
    compiled, xla_mem[k] = compile_with_memory(fn, args)
    calls[k] = functools.partial(compiled, *args)
  threads = {"xla": os.cpu_count()}
  if peers:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())  # XLA's CPU pool: one thread per core.
    threads["torch"] = torch.get_num_threads()
    calls.update(torch_peers(folder, dtype, batch, proj_dim, seed))
  t0 = time.perf_counter()
  stats = time_methods(calls, repeats, NO_WARMUP)
  eps = {k: batch_size / v["median"] for k, v in stats.items()}
  tps = {k: real_tokens / v["median"] for k, v in stats.items()}
  print(f"\n== {name}: {m['counts']['total'] / 1e6:.1f}M params ({m['counts']['adapter']} "
        f"adapter), vocab {cfg.vocab_size}, {dtype}, batch {batch_size} x L={seq_len} "
        f"({real_tokens} real tokens), vocab_chunk {vocab_chunk}, proj_dim {proj_dim}, "
        f"{repeats} rounds, {time.perf_counter() - t0:.0f} s, threads {threads}")
  print(f"{'method':<14} {'s/batch':>9} {'examples/s':>11} {'tokens/s':>10} {'x forward':>10} "
        f"{'best s':>9} {'cpu s':>9} {'XLA temp MB':>12}")
  for k, st in stats.items():
    print(f"{k:<14} {st['median']:>9.3f} {eps[k]:>11.3f} {tps[k]:>10.1f} "
          f"{eps[k] / eps['forward']:>10.3f} {st['best']:>9.3f} {st['cpu']:>9.3f} "
          f"{xla_mem.get(k, {}).get('temp', float('nan')):>12.1f}", flush=True)
  rec = {"device": device_name(), "model": name, "dtype": dtype, "seq_len": seq_len,
         "vocab": cfg.vocab_size, "params": m["counts"]["total"],
         "adapter_params": m["counts"]["adapter"], "batch": batch_size,
         "real_tokens": real_tokens, "vocab_chunk": vocab_chunk, "proj_dim": proj_dim,
         "repeats": repeats, "threads": threads,
         "examples_per_s": {k: round(v, 4) for k, v in eps.items()},
         "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
         "ratio_to_forward": {k: round(eps[k] / eps["forward"], 4) for k in eps if k != "forward"},
         "xla_temp_mb": {k: v["temp"] for k, v in xla_mem.items()}}
  peak = matmul_peak(dtype)
  flops = method_flops(cfg, seq_len, batch_size, m["counts"]["adapter"], proj_dim)
  mfu = {k: flops[k] / stats[k]["median"] / peak for k in stats if k in flops}
  print(f"matmul peak {peak / 1e12:.3f} TFLOP/s ({dtype}, {device_name()}); MFU (model FLOPs "
        "from the config / median s / peak): "
        + ", ".join(f"{k} {v:.1%}" for k, v in mfu.items()), flush=True)
  rec.update({"forward_flops_per_example": forward_flops_per_example(cfg, seq_len),
              "matmul_peak_tflops": round(peak / 1e12, 4),
              "mfu": {k: round(v, 4) for k, v in mfu.items()}})
  if peers:
    rec["matmul_vs_torch"] = matmul_vs_torch(cfg, batch_size * seq_len)
    rec["vs_peers"] = {p: round(eps["align"] / eps[p], 3) for p in PEER_METHODS}
    rec["forward_vs_torch"] = round(eps["forward"] / eps["torch_forward"], 3)
    print(f"vs_peers (jbat align / peer, examples/s): {rec['vs_peers']}; jbat forward / "
          f"torch forward: {rec['forward_vs_torch']}", flush=True)
  if memory:
    del m, jm, calls
    rss = peak_rss(folder, dtype, seq_len, batch_size,
                   list(methods) + (list(PEER_METHODS) if peers else []), proj_dim, seed,
                   vocab_chunk)
    rec["peak_rss_mb"] = rss
    rec["peak_rss_ratio_to_forward"] = {k: round(v / rss["forward"], 3) for k, v in rss.items()
                                        if k not in ("forward", "load")}
    print(f"peak RSS / forward's: {rec['peak_rss_ratio_to_forward']}", flush=True)
  return rec


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="demo model only (< 3 min on 2 CPUs)")
  p.add_argument("--models", default=None,
                 help=f"comma-separated subset of {sorted(MODELS)} (default: all, or demo "
                      "with --quick)")
  p.add_argument("--batch", type=int, default=None,
                 help="examples per batch (default: 32; 4 with --pretrained / --smollm2)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds per model, median taken (default: 5 demo, 3 for 25m, "
                      "2 pretrained)")
  p.add_argument("--proj-dim", type=int, default=None,
                 help="LESS projection dimension (default: 1024; 8192 as LESS with a "
                      "pretrained model)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32",
                 help="compute dtype(s) of the model, comma-separated from float32,bfloat16 "
                      "(parameters stay float32)")
  p.add_argument("--pretrained", default=None,
                 help="a pretrained checkpoint (HF folder or .gguf file) instead of --models")
  p.add_argument("--smollm2", action="store_true",
                 help="--pretrained = SmolLM2-135M-Instruct (Q4_1 GGUF via jbat.models.hub_free)")
  p.add_argument("--seq-lens", default="128",
                 help="comma-separated sequence lengths for --pretrained (e.g. 128,512)")
  p.add_argument("--vocab-chunk", type=int, default=8192,
                 help="vocabulary chunk of the loss for --pretrained (0: full logits)")
  p.add_argument("--methods", default=",".join(PRETRAINED_METHODS),
                 help=f"jbat methods for --pretrained, from {','.join(PRETRAINED_METHODS)}")
  p.add_argument("--peers", action="store_true",
                 help="also time transformers + peft peers (torch_forward, less_loop, "
                      "less_loop_packed, trak_vmap) in the same rounds; adds vs_peers to the "
                      "JSON line")
  p.add_argument("--matmul-only", action="store_true",
                 help="with --pretrained/--smollm2 and torch installed: only time the model's "
                      "weight matmuls (batch x seq-len rows) in XLA and in torch")
  p.add_argument("--memory", action="store_true",
                 help="peak RSS per method, each in a fresh subprocess (--pretrained)")
  p.add_argument("--memory-only", action="store_true",
                 help="--memory without the timed rounds")
  args = p.parse_args(argv)
  dtypes = args.dtype.split(",")
  if any(d not in ("float32", "bfloat16") for d in dtypes):
    p.error(f"--dtype: expected float32 and/or bfloat16, got {args.dtype!r}")
  if (args.batch is not None and args.batch <= 0) or (
      args.repeats is not None and args.repeats <= 0):
    p.error("--batch and --repeats must be positive")
  print(f"jax {jax.__version__}, device: {device_name()}")
  if args.pretrained or args.smollm2:
    if args.smollm2:
      from jbat.models import hub_free  # pylint: disable=import-outside-toplevel
      args.pretrained = str(hub_free.smollm2_gguf())
    methods = tuple(args.methods.split(","))
    if any(k not in PRETRAINED_METHODS for k in methods) or "forward" not in methods or (
        args.peers and "align" not in methods):
      p.error(f"--methods: a subset of {PRETRAINED_METHODS} with forward (and align with "
              "--peers)")
    folder = hf_folder(args.pretrained)
    name = os.path.basename(args.pretrained.rstrip("/"))
    records = []
    for seq_len in [int(x) for x in args.seq_lens.split(",")]:
      for dtype in dtypes:
        kw = dict(folder=folder, dtype=dtype, seq_len=seq_len, batch_size=args.batch or 4,
                  proj_dim=args.proj_dim or 8192, seed=args.seed,
                  vocab_chunk=args.vocab_chunk or None)
        if args.matmul_only:
          from jbat.models import hf_io  # pylint: disable=import-outside-toplevel
          cfg = dataclasses.replace(hf_io.read_config(folder, dtype)[0], max_len=seq_len)
          rec = {"model": name, "dtype": dtype, "seq_len": seq_len, "batch": kw["batch_size"],
                 "device": device_name(),
                 "matmul_vs_torch": matmul_vs_torch(cfg, kw["batch_size"] * seq_len)}
        elif args.memory_only:
          rss = peak_rss(methods=list(methods) + (list(PEER_METHODS) if args.peers else []),
                         **kw)
          rec = {"model": name, "dtype": dtype, "seq_len": seq_len, "batch": kw["batch_size"],
                 "vocab_chunk": kw["vocab_chunk"], "peak_rss_mb": rss,
                 "peak_rss_ratio_to_forward": {k: round(v / rss["forward"], 3)
                                               for k, v in rss.items()
                                               if k not in ("forward", "load")}}
          print(f"peak RSS / forward's: {rec['peak_rss_ratio_to_forward']}", flush=True)
        else:
          rec = run_pretrained(name=name, repeats=args.repeats or 2, peers=args.peers,
                               memory=args.memory, methods=methods, **kw)
        records.append(rec)
  else:
    names = (args.models.split(",") if args.models
             else ["demo"] if args.quick else list(MODELS))
    for n in names:
      if n not in MODELS:
        p.error(f"--models: unknown model {n!r}, expected some of {sorted(MODELS)}")
    records = [run_model(n, args.batch or 32, args.repeats or DEFAULT_REPEATS[n],
                         args.proj_dim or 1024, args.seed, d) for n in names for d in dtypes]
  print()
  for rec in records:
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
