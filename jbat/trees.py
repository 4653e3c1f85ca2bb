"""Adapter pytrees: leafwise difference and a structure check with a readable error.

Below every stage (the surrogate builds delta = phi_s - phi0 with `tree_sub`; the scoring
kernels and the surrogate check adapters with `check_same_structure`), so both import it
without importing each other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jbat.errors import JbatError

PyTree = Any


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  """Leafwise a - b (same structure as `a`), e.g. delta = tree_sub(phi_s, phi0)."""
  return jax.tree.map(jnp.subtract, a, b)


def check_same_structure(reference: PyTree, other: PyTree, *, name: str = "delta",
                         reference_name: str = "phi0") -> None:
  """Raise JbatError unless `other` has the tree structure and leaf shapes of `reference`.

  The message names the first differing leaf by its path and gives both shapes (or the leaf
  paths present in one tree and missing in the other).
  """
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
  ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
  oth_paths = [jax.tree_util.keystr(p) for p, _ in oth_leaves]
  if ref_paths != oth_paths:
    missing = [p for p in ref_paths if p not in oth_paths]
    extra = [p for p in oth_paths if p not in ref_paths]
    raise JbatError(
        f"scoring: {name} must have the tree structure of {reference_name}; leaves missing in "
        f"{name}: {missing or 'none'}; leaves not in {reference_name}: {extra or 'none'}"
        + ("" if missing or extra else f"; leaf order differs: {oth_paths} vs {ref_paths}"))
  for path, (_, r), (_, o) in zip(ref_paths, ref_leaves, oth_leaves):
    if jnp.shape(r) != jnp.shape(o):
      raise JbatError(f"scoring: leaf {path} of {name} has shape {tuple(jnp.shape(o))}, but the "
                      f"same leaf of {reference_name} has shape {tuple(jnp.shape(r))}")
  if ref_def != oth_def:
    raise JbatError(f"scoring: {name} has the leaves of {reference_name} but a different "
                    f"container type: {oth_def} vs {ref_def}")
