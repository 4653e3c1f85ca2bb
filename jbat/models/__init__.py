"""Model definitions (math only); weight loading lives in sibling modules."""

from jbat.models.causal_lm import CausalLM, LMConfig

__all__ = ["CausalLM", "LMConfig"]
