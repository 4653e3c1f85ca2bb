"""Model definitions (math only); weight loading lives in sibling modules."""

from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.models.hf_io import load_causal_lm, save_causal_lm

__all__ = ["CausalLM", "LMConfig", "load_causal_lm", "save_causal_lm"]
