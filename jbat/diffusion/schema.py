"""The personalization config: its schema (`base_config`), names and validation."""

from __future__ import annotations

import ml_collections

from jbat import config as config_lib
from jbat import lora, registry
from jbat.data import images
from jbat.diffusion.denoiser import DenoiserConfig
from jbat.errors import JbatError


ARMS = ("none", "prior", "random", "oracle", "albat", "less")
# The arms a config runs unless it lists its own: oracle and less are the references of the
# results runs (configs/personalize_demo.py:full); less scores the pool ~4 times over.
DEFAULT_ARMS = ("none", "prior", "random", "albat")


SCORES = ("align", "loss_diff", "rel_loss_diff")


# Per run (subject, arm, seed), on the subject's TEST images (see personalize's docstring).
METRICS = ("subject_fid", "prompt_fid", "class_pres", "diversity", "frechet", "loss_fid",
           "drift")


LOWER_IS_BETTER = {"subject_fid": False, "prompt_fid": False, "class_pres": False,
                   "diversity": False, "frechet": True, "loss_fid": True, "drift": True}


TRAIN_KEYS = ("x", "label", "ident", "weight")


SUBJECT_IDENT = 1


def base_config() -> ml_collections.ConfigDict:
  """The schema of a personalization config: every key, its default and (by it) its type."""
  c = ml_collections.ConfigDict()
  c.pipeline = "personalize"
  c.name = "personalize"
  c.workdir = ""  # Empty: runs/<name>.
  c.cache_dir = ""  # Empty: $JBAT_CACHE or ~/.cache/jbat (data, backbone, classifier).
  c.seed = 0  # Data split, k-means, pool subset, surrogate, prior images.
  c.progress = True
  c.arms = ",".join(DEFAULT_ARMS)
  c.seeds = "0,1,2"  # Training seeds; arms are paired by seed.

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "fashion_mnist"  # or "digits" (8x8, bundled with scikit-learn; tests)
  # Subjects (a rule fixed before any result): for each class listed, k-means (pixel space,
  # data.n_clusters, seed) of its test images; the `subjects_per_class` largest clusters are
  # the subjects. Default classes: one top, one shoe, one accessory (t-shirt, sneaker, bag).
  c.data.subject_classes = "0,7,8"
  c.data.subjects_per_class = 2
  c.data.n_clusters = 4  # k-means of each subject class's test images
  c.data.n_subject = 5  # adaptation images of a subject
  c.data.n_val = 10  # validation images of a subject
  c.data.n_heldout = 100  # at most this many test images of a subject
  c.data.n_drift = 100  # at most this many other class images for the drift metric
  c.data.pool_size = 2000  # backbone pool (train split subset) random / albat draw from
  c.data.backbone_keep = 1.0  # fraction of the subject class kept for pretraining

  c.model = ml_collections.ConfigDict()
  c.model.arch = "unet"  # "unet" (jbat.diffusion.denoiser.UNet) or "dit" (Denoiser)
  c.model.widths = "32,64"  # U-Net channels per resolution level
  c.model.patch = 2  # DiT patch; U-Net space-to-depth stem (1: none)
  c.model.d_model = 64  # conditioning width (and the DiT's token width)
  c.model.depth = 4  # DiT blocks
  c.model.n_heads = 4
  c.model.mlp_ratio = 4  # DiT MLP

  c.backbone = ml_collections.ConfigDict()
  c.backbone.steps = 1200
  c.backbone.batch_size = 64
  c.backbone.lr = 1e-3
  c.backbone.warmup_steps = 100
  c.backbone.weight_decay = 0.0
  c.backbone.p_uncond = 0.1  # label dropout for classifier-free guidance
  c.backbone.ema_decay = 0.995  # the backbone is the EMA of the pretraining weights
  c.backbone.ckpt_every = 250

  c.classifier = ml_collections.ConfigDict()
  c.classifier.steps = 600
  c.classifier.batch_size = 128
  c.classifier.lr = 2e-3
  c.classifier.width = 16
  c.classifier.embed_dim = 64

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 4
  c.lora.alpha = 8.0
  # jbat.lora's defaults (attention and MLP projections) plus the U-Net's conditioning FiLM.
  c.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj|fc1|fc2|emb_proj)$"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.lr = 2e-3
  c.train.warmup_steps = 10
  c.train.subject_rows = 5
  c.train.aug_rows = 5
  c.train.aug_weight = 1.0  # DreamBooth's prior-loss weight (diffusers' default 1.0)
  c.train.ckpt_every = 50
  c.train.log_every = 25

  c.aug = ml_collections.ConfigDict()
  c.aug.k = 100  # backbone images per augmented arm (prior / random / albat)

  c.surrogate = ml_collections.ConfigDict()
  c.surrogate.steps = 100
  c.surrogate.lr = 2e-3

  c.score = ml_collections.ConfigDict()
  c.score.name = "loss_diff"  # one of SCORES
  c.score.n_draws = 2  # seeded (t, noise) draws per pool image
  c.score.batch_size = 100
  c.score.cond = "own"  # "own": each pool image's label; "subject": "[V] <subject class>"

  c.select = ml_collections.ConfigDict()
  c.select.rule = "threshold_uniform"
  c.select.tau = "default"  # "default" (0 for align / loss_diff), "none", or a number
  c.select.top_n = 200
  c.select.n_clusters = 8

  c.eval = ml_collections.ConfigDict()
  c.eval.n_draws = 4
  c.eval.batch_size = 100
  c.eval.n_samples = 50  # "[V] <class>" and "<class>" samples per run
  c.eval.n_backbone_samples = 50  # backbone samples per class (the per-class table)
  c.eval.sample_steps = 25
  c.eval.guidance = 2.0
  c.eval.gen_batch = 50
  return c


def select_tau(config: ml_collections.ConfigDict) -> float | None | str:
  return registry.parse_tau(config.select.tau)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises JbatError naming the field for unknown keys, wrong types or out-of-range values."""
  config_lib.check_schema(config, base_config())
  given = config_lib.flatten(config)
  if config.pipeline != "personalize":
    raise JbatError(f"config: pipeline must be 'personalize', got {config.pipeline!r}")
  if config.data.dataset not in images.DATASETS:
    raise JbatError(f"config: data.dataset must be one of {list(images.DATASETS)}, got "
                    f"{config.data.dataset!r}")
  positive = ("data.n_clusters", "data.subjects_per_class", "data.n_subject", "data.n_val",
              "data.n_heldout", "data.n_drift", "eval.n_backbone_samples",
              "data.pool_size", "model.patch", "model.d_model", "model.depth", "model.n_heads",
              "model.mlp_ratio", "backbone.steps", "backbone.batch_size", "backbone.lr",
              "classifier.steps", "classifier.batch_size", "classifier.lr", "classifier.width",
              "classifier.embed_dim", "lora.rank", "train.steps", "train.lr",
              "train.subject_rows", "train.aug_rows", "aug.k", "surrogate.steps",
              "surrogate.lr", "score.n_draws", "score.batch_size", "select.n_clusters",
              "eval.n_draws", "eval.batch_size", "eval.n_samples", "eval.sample_steps",
              "eval.gen_batch")
  for key in positive:
    if given[key] <= 0:
      raise JbatError(f"config: {key} must be > 0, got {given[key]!r}")
  nonneg = ("seed", "backbone.warmup_steps",
            "backbone.weight_decay", "backbone.ckpt_every", "train.warmup_steps",
            "train.aug_weight", "train.ckpt_every", "train.log_every", "select.top_n")
  for key in nonneg:
    if given[key] < 0:
      raise JbatError(f"config: {key} must be >= 0, got {given[key]!r}")
  if not 0.0 < config.data.backbone_keep <= 1.0:
    raise JbatError(f"config: data.backbone_keep must be in (0, 1], got "
                    f"{config.data.backbone_keep!r}")
  if not 0.0 <= config.backbone.ema_decay < 1.0:
    raise JbatError(f"config: backbone.ema_decay must be in [0, 1), got "
                    f"{config.backbone.ema_decay!r}")
  if not 0.0 <= config.backbone.p_uncond < 1.0:
    raise JbatError(f"config: backbone.p_uncond must be in [0, 1), got "
                    f"{config.backbone.p_uncond!r}")
  subject_classes(config)  # raises JbatError naming data.subject_classes
  if config.data.subjects_per_class >= config.data.n_clusters:
    raise JbatError(f"config: data.subjects_per_class ({config.data.subjects_per_class}) must "
                    f"be < data.n_clusters ({config.data.n_clusters}): the other clusters "
                    "measure drift")
  arms = config_lib.arm_list(config)
  if "dsir" in arms:
    raise JbatError("config: arms: dsir weighs hashed word n-grams of text; the image task has "
                    f"no dsir arm (arms: {list(ARMS)})")
  bad = [a for a in arms if a not in ARMS]
  if not arms or bad:
    raise JbatError(f"config: arms must be a comma-separated subset of {list(ARMS)}, got "
                    f"{config.arms!r}")
  try:
    seeds = config_lib.seed_list(config)
  except ValueError:
    raise JbatError(f"config: seeds must be comma-separated integers, got "
                    f"{config.seeds!r}") from None
  if not seeds:
    raise JbatError("config: seeds must list at least one integer seed")
  if config.score.name not in SCORES:
    raise JbatError(f"config: score.name must be one of {list(SCORES)}, got "
                    f"{config.score.name!r}")
  if config.score.cond not in ("own", "subject"):
    raise JbatError(f"config: score.cond must be 'own' or 'subject', got {config.score.cond!r}")
  # round_robin needs per-adaptation-example gradient features, which this task has not.
  registry.check_choice(config.select.rule,
                        tuple(r for r in registry.RULES if r != "round_robin"),
                        "config: select.rule")
  select_tau(config)
  if config.aug.k > config.data.pool_size:
    raise JbatError(f"config: aug.k ({config.aug.k}) must be <= data.pool_size "
                    f"({config.data.pool_size})")
  lora.LoRAConfig(config.lora.rank, float(config.lora.alpha), config.lora.targets).validate()
  image_size = 8 if config.data.dataset == "digits" else 28
  denoiser_config(config, image_size).validate()
  if image_size % 4:
    raise JbatError("config: data.dataset images must have a size divisible by 4")


def subject_classes(config: ml_collections.ConfigDict) -> list[int]:
  """data.subject_classes "0,7,8" -> [0, 7, 8]; JbatError naming the field otherwise."""
  text = str(config.data.subject_classes)
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    classes = []
  if not classes or any(not 0 <= c < 10 for c in classes) or len(set(classes)) < len(classes):
    raise JbatError(f"config: data.subject_classes must be distinct comma-separated class ids "
                    f"in [0, 10), got {text!r}")
  return classes


def parse_widths(text: str) -> tuple[int, ...]:
  """"32,64" -> (32, 64); JbatError naming model.widths otherwise."""
  try:
    widths = tuple(int(w) for w in str(text).split(",") if w.strip())
  except ValueError:
    raise JbatError(f"config: model.widths must be comma-separated integers, got "
                    f"{text!r}") from None
  if not widths:
    raise JbatError("config: model.widths must list at least one width")
  return widths


def denoiser_config(config: ml_collections.ConfigDict, image_size: int) -> DenoiserConfig:
  m = config.model
  return DenoiserConfig(image_size=image_size, channels=1, patch=m.patch, d_model=m.d_model,
                        depth=m.depth, n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, n_classes=10,
                        n_identifiers=1, arch=m.arch, widths=parse_widths(m.widths))
