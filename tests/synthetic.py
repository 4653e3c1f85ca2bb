"""A small synthetic labelled corpus for tests: three domains with distinct vocabularies."""

import json
import pathlib

import numpy as np

WORDS = {
    "space": "rocket orbit moon planet star comet launch crew gravity telescope".split(),
    "cooking": "flour sugar oven butter salt pan bake stir onion garlic".split(),
    "music": "guitar drum melody chord tempo singer piano song rhythm bass".split(),
}
COMMON = "the a of and to in is it with on".split()


def documents(n_per_domain: int = 60, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  docs = []
  for domain, words in WORDS.items():
    for i in range(n_per_domain):
      n = int(rng.integers(6, 20))
      toks = [str(rng.choice(words if rng.random() < 0.6 else COMMON)) for _ in range(n)]
      docs.append({"text": " ".join(toks) + f" {i}.", "domain": domain})
  return docs


def write_jsonl(path: pathlib.Path, n_per_domain: int = 60, seed: int = 0) -> pathlib.Path:
  path.write_text("".join(json.dumps(d) + "\n" for d in documents(n_per_domain, seed)))
  return path


def tiny_hf_corpus(d: pathlib.Path) -> pathlib.Path:
  """Writes a labelled corpus (30 documents per domain) and a tiny untrained Hugging Face
  model folder `d / "hf"` (jbat's BPE tokenizer, max_len 32) into `d`; returns the corpus."""
  from flax import nnx
  from jbat.data.tokenizer import train_bpe_tokenizer
  from jbat.models.causal_lm import CausalLM, LMConfig
  from jbat.models.hf_io import save_causal_lm
  corpus = write_jsonl(d / "corpus.jsonl", 30)
  tok = train_bpe_tokenizer([x["text"] for x in documents(30)], 300, d / "tokenizer.json")
  cfg = LMConfig(vocab_size=len(tok), max_len=32, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                 qkv_bias=True)
  save_causal_lm(CausalLM(cfg, rngs=nnx.Rngs(0)), tok, d / "hf")
  return corpus
