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
