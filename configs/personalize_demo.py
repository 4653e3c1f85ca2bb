"""DreamBooth-style personalization of a small diffusion model, with ALBAT-selected backbone data.

  python -m jbat.train --config configs/personalize_demo.py        # ~14 min cold, ~6 warm
  python -m jbat.train --config configs/personalize_demo.py:tiny   # digits, toy size (tests)

Timing on a shared 2-core CPU: cold 14 min (Fashion-MNIST fetch 4 s, backbone pretraining
7.6 min, classifier 50 s, surrogate + pool scoring 1.5 min, 4 arms x 3 seeds 3.6 min); warm
(backbone and classifier cached under the cache dir) about 6 min. A rerun of a finished or
interrupted workdir only runs what is missing.

Task: Fashion-MNIST (Debian `dataset-fashion-mnist`, fetched into the cache). The backbone is
a class-conditional DiT (patch 4, d 64, 4 blocks) pretrained on the train split; the subject
is one k-means cluster (pixel space) of the "sneaker" class of the test split: 5 images teach
the identifier "[V] sneaker", the rest of the cluster is held out. Arms (same steps, seeds,
rows per batch): none, prior (DreamBooth prior preservation with backbone-generated sneakers,
weight 1.0), random (random pool images) and albat (surrogate LoRA on the 5 images, loss_diff
scores of the pool, threshold_uniform among the top 300). See jbat/diffusion/personalize.py.
"""

from jbat.diffusion.personalize import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "personalize_demo"
  c.data.dataset = "fashion_mnist"
  c.data.subject_class = 7  # sneaker
  c.seeds = "0,1,2"

  if arg == "tiny":  # scikit-learn digits (8x8, no download), seconds on a CPU.
    c.name = "personalize_tiny"
    c.progress = False
    c.seeds = "0,1"
    c.data.dataset = "digits"
    c.data.subject_class = 7
    c.data.n_clusters = 2
    c.data.n_subject = 3
    c.data.n_heldout = 16
    c.data.n_drift = 16
    c.data.pool_size = 120
    c.model.patch = 2
    c.model.d_model = 16
    c.model.depth = 1
    c.model.n_heads = 2
    c.model.mlp_ratio = 2
    c.backbone.steps = 20
    c.backbone.batch_size = 16
    c.backbone.warmup_steps = 2
    c.backbone.ckpt_every = 0  # only at the end (orbax saves cost ~0.5 s each)
    c.classifier.steps = 20
    c.classifier.batch_size = 32
    c.classifier.width = 4
    c.classifier.embed_dim = 8
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.train.steps = 6
    c.train.warmup_steps = 1
    c.train.subject_rows = 2
    c.train.aug_rows = 2
    c.train.ckpt_every = 0
    c.train.log_every = 3
    c.aug.k = 8
    c.surrogate.steps = 6  # = train.steps: the surrogate and `none` share one compiled step
    c.score.n_draws = 2
    c.score.batch_size = 32
    c.select.top_n = 20
    c.eval.n_draws = 2
    c.eval.batch_size = 16
    c.eval.n_samples = 4
    c.eval.sample_steps = 3
    c.eval.gen_batch = 8
  elif arg:
    raise ValueError(f"configs/personalize_demo.py: unknown variant {arg!r} (known: tiny)")
  return c
