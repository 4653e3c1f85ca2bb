"""LoRA adapters for flax.nnx models: wrap selected `nnx.Linear`s, split adapter from backbone.

A LoRA linear computes  y = W x + b + (alpha / r) * (x A) B,  with A: [in, r], B: [r, out].
At init B = 0, so the adapted model equals the backbone bit for bit (phi_0 in docs/method.md).
Adapter weights are `nnx.LoRAParam` (a subclass of `nnx.Param`), the frozen backbone weights
stay `nnx.Param`; `split` puts the LoRA filter first so the two sets are disjoint.

DoRA (`LoRAConfig.dora`, weight-decomposed LoRA, Liu et al. 2024, as peft's `use_dora`) adds a
learned magnitude m [out] per linear and normalises the adapted kernel per output column:

  V = W + (alpha / r) A B   ([in, out]),   y = m * (x V) / ||V||_c + b,

with ||V||_c the L2 norm of each column of V (over the input axis) and m initialised to ||W||_c,
so at init (B = 0) the model equals the backbone. As in the paper (section 4.3) and peft,
||V||_c is treated as a constant in the backward pass (`stop_gradient`): the gradient flows
through x V and m only.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jbat.errors import JbatError

DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|fc1|fc2|gate_proj|up_proj|down_proj)$"

adapter_filter = nnx.LoRAParam  # nnx filter selecting the adapter (phi) leaves.


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank r, alpha (scale = alpha / r), targets: regex `re.fullmatch`ed on dotted module paths."""

  rank: int = 8
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS
  dora: bool = False  # Weight-decomposed LoRA (DoRALinear) instead of plain LoRA.

  def validate(self) -> None:
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise JbatError(f"lora.rank: expected a positive integer, got {self.rank!r}")
    try:
      re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise JbatError(f"lora.targets: {self.targets!r} is not a valid regular expression ({e})")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoRALinear(nnx.Module):
  """base(x) + scale * (x @ lora_a) @ lora_b, computed in the base linear's dtype.

  lora_a: [in, r] ~ N(0, 1/in) (kaiming-like: x A keeps the scale of x); lora_b: [r, out] = 0.
  """

  def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs: nnx.Rngs):
    self.base = base
    self.scale = float(scale)
    n_in, n_out = base.in_features, base.out_features
    std = 1.0 / np.sqrt(n_in)
    self.lora_a = nnx.LoRAParam(std * jax.random.normal(rngs.params(), (n_in, rank), jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, n_out), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.base.dtype or x.dtype
    a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
    return self.base(x) + ((x.astype(dt) @ a) @ b) * jnp.asarray(self.scale, dt)


def column_norms(kernel: jax.Array) -> jax.Array:
  """L2 norm of each output column of an [in, out] kernel, float32 [out]."""
  return jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)


class DoRALinear(LoRALinear):
  """DoRA: base(x) + (g - 1) (x W) + g * scale * (x A) B  with  g = m / ||W + scale A B||_c
  (= m * x V / ||V||_c + b, see the module docstring). magnitude m: [out] = ||W||_c at init."""

  def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs: nnx.Rngs):
    super().__init__(base, rank, scale, rngs=rngs)
    self.magnitude = nnx.LoRAParam(column_norms(base.kernel[...]))

  def gain(self) -> jax.Array:
    """g = m / ||W + scale A B||_c, float32 [out], the norm held constant for gradients."""
    v = self.base.kernel[...].astype(jnp.float32) + self.scale * (self.lora_a[...] @
                                                                  self.lora_b[...])
    return self.magnitude[...] / jax.lax.stop_gradient(column_norms(v))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.base.dtype or x.dtype
    a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
    y = self.base(x)
    xw = y - self.base.bias[...].astype(y.dtype) if self.base.bias is not None else y
    g = self.gain().astype(dt)
    return y + (g - 1) * xw + g * (((x.astype(dt) @ a) @ b) * jnp.asarray(self.scale, dt))


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _get(model: nnx.Module, path: tuple) -> nnx.Module:
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def _set_child(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
  parent = _get(model, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
  """In place: every `nnx.Linear` whose dotted path `re.fullmatch`es cfg.targets becomes a
  LoRALinear. Returns the sorted matched paths (e.g. "layers.0.attn.q_proj").

  Already-wrapped linears (path "...q_proj.base") are not matched by the default targets.
  Raises JbatError naming lora.targets when nothing matches.
  """
  cfg.validate()
  pattern = re.compile(cfg.targets)
  matches = sorted(
      (path for path, node in nnx.iter_modules(model)
       if type(node) is nnx.Linear and pattern.fullmatch(_path_str(path))),
      key=_path_str)
  if not matches:
    raise JbatError(f"lora.targets: {cfg.targets!r} matched no nnx.Linear in the model")
  for path in matches:
    base = _get(model, path)
    wrapper = DoRALinear if cfg.dora else LoRALinear
    _set_child(model, path, wrapper(base, cfg.rank, cfg.scale, rngs=rngs))
  return [_path_str(p) for p in matches]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, adapter_state (LoRAParam), rest_state (everything else, incl. nnx.Param))."""
  return nnx.split(model, adapter_filter, ...)


def merge(graphdef: nnx.GraphDef, adapter_state: nnx.State, rest_state: nnx.State) -> nnx.Module:
  """Inverse of `split`: a new module from the graphdef and the two states."""
  return nnx.merge(graphdef, adapter_state, rest_state)


def count_params(model: nnx.Module) -> dict[str, int]:
  """{"total", "adapter", "base"}: element counts of all nnx.Param, LoRAParam, and the rest."""
  size = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  _, adapter, base = nnx.split(model, adapter_filter, nnx.Param, ...)[:3]
  n_adapter, n_base = size(adapter), size(base)
  return {"total": n_adapter + n_base, "adapter": n_adapter, "base": n_base}


def merge_into_base(model: nnx.Module) -> nnx.Module:
  """A new model (the input is untouched) where each LoRALinear is a plain nnx.Linear with
  kernel W + scale * A @ B (float32; DoRA: g * (W + scale * A @ B) per output column), so it
  runs at the backbone's cost."""
  model = nnx.clone(model)
  paths = [p for p, node in nnx.iter_modules(model) if isinstance(node, LoRALinear)]
  for path in paths:
    lora = _get(model, path)
    base = lora.base
    delta = lora.scale * (lora.lora_a[...] @ lora.lora_b[...])
    merged = base.kernel[...] + delta.astype(base.kernel[...].dtype)
    if isinstance(lora, DoRALinear):
      merged = (merged * lora.gain()).astype(base.kernel[...].dtype)
    base.kernel[...] = merged
    _set_child(model, path, base)
  return model


def adapter_to_flat(adapter_state: nnx.State) -> dict[str, np.ndarray]:
  """{"layers.0.attn.q_proj.lora_a": array, ...} with host numpy values (for export / checks)."""
  return {_path_str(path): np.asarray(var[...] if isinstance(var, nnx.Variable) else var)
          for path, var in nnx.to_flat_state(adapter_state)}


def adapter_from_flat(flat: dict[str, np.ndarray], template: nnx.State) -> nnx.State:
  """Inverse of `adapter_to_flat`, shaped like `template` (e.g. `split(model)[1]`).

  Raises JbatError if the key sets or any shape differ (an adapter for another model/config).
  """
  want = adapter_to_flat(template)
  missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  if missing or extra:
    raise JbatError(f"adapter: keys do not match the model (missing {missing[:5]}, "
                    f"unexpected {extra[:5]})")
  for k, v in want.items():
    if tuple(np.shape(flat[k])) != v.shape:
      raise JbatError(f"adapter: {k} has shape {np.shape(flat[k])}, the model expects {v.shape}")
  leaves = []
  for path, var in nnx.to_flat_state(template):
    value = jnp.asarray(flat[_path_str(path)], dtype=want[_path_str(path)].dtype)
    leaves.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
  return nnx.from_flat_state(leaves)
