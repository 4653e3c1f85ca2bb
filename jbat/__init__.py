"""jbat: Backbone Augmented Training (BAT) and ALBAT in JAX/Flax.

Pipeline: data -> models (+ lora) -> surrogate -> scoring -> selection -> training -> report.

`jbat.select` and `jbat.adapt` (the Python API, `jbat.api`) are imported on first use, so
`import jbat` does not import jax.
"""

__version__ = "0.1.0"
__all__ = ["adapt", "select"]


def __getattr__(name: str):
  if name in ("select", "adapt"):
    from jbat import api
    return getattr(api, name)
  raise AttributeError(f"module 'jbat' has no attribute {name!r}")
