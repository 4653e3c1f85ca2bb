"""jbat: Backbone Augmented Training (BAT) and ALBAT in JAX/Flax.

Pipeline: data -> models (+ lora) -> surrogate -> scoring -> selection -> training -> report.
"""

__version__ = "0.1.0"
