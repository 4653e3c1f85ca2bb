"""Placing loaded weights into a `CausalLM`: shared by the Hugging Face and GGUF loaders.

The loaders only map their file's tensors to jbat's parameter names (`name -> numpy array`);
`assemble` checks the shapes and that every parameter was given, casts to the storage dtype and
puts each tensor on its devices one at a time (no full model on the host as jax arrays).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig

# (parameter name, shape) -> where that parameter lives.
Sharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def path_str(path: tuple) -> str:
  """"layers.0.attn.q_proj.kernel" of an nnx state path."""
  return ".".join(str(p) for p in path)


def default_sharding(mesh: jax.sharding.Mesh | None) -> Sharding:
  """Every parameter replicated over `mesh` (or on the first device without one)."""
  target = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  return lambda _name, _shape: target


def assemble(cfg: LMConfig, params: Iterable[tuple[str, np.ndarray]], *, store: np.dtype,
             mesh: jax.sharding.Mesh | None = None, sharding: Sharding | None = None,
             where: str = "") -> CausalLM:
  """A CausalLM of `cfg` holding `params` (name -> array), each cast to `store` and placed by
  `sharding` (default: replicated over `mesh`). JbatError naming `where` for a parameter of
  the wrong shape or one that `params` does not give."""
  sharding = sharding or default_sharding(mesh)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  want = {path_str(p): v for p, v in nnx.to_flat_state(state)}
  loaded: dict[str, jax.Array] = {}
  for name, x in params:
    expect = tuple(want[name].shape)
    if x.shape != expect:  # Only reachable through an internal mapping bug.
      raise JbatError(f"{where}: parameter {name} has shape {x.shape}, expected {expect}")
    loaded[name] = jax.device_put(x if x.dtype == store else x.astype(store),
                                  sharding(name, expect))
  missing = sorted(set(want) - set(loaded))
  if missing:
    raise JbatError(f"{where}: no tensor mapped to the parameters {missing[:5]}")
  leaves = [(p, v.replace(loaded[path_str(p)])) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))
