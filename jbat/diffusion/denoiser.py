"""A small DiT denoiser eps_theta(x_t, t, token) for class- and subject-conditioned diffusion.

Images x: f32[B, H, W, C] (NHWC). The image is cut into non-overlapping p x p patches, each
patch is linearly embedded (`patch_embed`) and given a learned position embedding, giving
N = (H/p)(W/p) tokens of width d. A conditioning vector c: f32[B, d] modulates every block
(adaLN-Zero, as in DiT):

  c = time_mlp(sinusoid(t)) + class_embed[label] + ident_embed[ident - 1] * [ident > 0]
  shift1, scale1, gate1, shift2, scale2, gate2 = ada(silu(c))          (each [B, d])
  h = h + gate1 * attn(LN(h) * (1 + scale1) + shift1)
  h = h + gate2 * mlp(LN(h) * (1 + scale2) + shift2)

and a final adaLN + linear layer maps every token back to p*p*C values: the predicted noise.

Conditioning tokens. `label` in [0, n_classes] selects a class row of `class_embed`; the
extra row `n_classes` is the null (unconditional) token used for classifier-free guidance.
`ident` in [0, n_identifiers] selects a reserved identifier ("[V]"); 0 means none. The prompt
"[V] sneaker" is (label=sneaker, ident=1): the identifier's vector is ADDED to the class
vector, as DreamBooth's "a [V] sneaker" puts a rare token next to the class noun.

Why the identifier table is an `nnx.LoRAParam`: LoRA training updates only adapter leaves
(`nnx.LoRAParam`), yet a new subject needs a trainable identifier vector. Making the identifier
table itself an adapter leaf (zero-initialised) keeps the "adapter = everything that is
trained" contract of jbat.lora: `lora.split` puts it with the LoRA A/B matrices, the scoring
kernels differentiate it like them, and at init (zero rows, B = 0) the adapted model equals
the backbone bit for bit. The backbone never uses identifiers during pretraining (ident = 0).

Every linear layer of the attention (q_proj, k_proj, v_proj, o_proj) and MLP (fc1, fc2) is an
`nnx.Linear`, so `jbat.lora.apply_lora` with its default regex targets them.
Cost per image: about depth * N * (12 d^2 + 2 N d) multiply-adds.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jbat.errors import JbatError

ARCHS = ("dit", "unet")
GROUPS = 8  # GroupNorm groups of the U-Net (every width is a multiple)


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  """Shape of the denoiser. image_size / patch must divide exactly."""

  image_size: int = 28
  channels: int = 1
  patch: int = 4
  d_model: int = 96
  depth: int = 4
  n_heads: int = 4
  mlp_ratio: int = 4
  n_classes: int = 10
  n_identifiers: int = 1
  arch: str = "dit"  # "dit" (this docstring) or "unet" (`UNet`)
  widths: tuple[int, ...] = (32, 64, 64)  # U-Net channels per resolution level

  def validate(self) -> None:
    for name in ("image_size", "channels", "patch", "d_model", "depth", "n_heads",
                 "mlp_ratio", "n_classes", "n_identifiers"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise JbatError(f"model.{name}: expected a positive integer, got {v!r}")
    if self.arch not in ARCHS:
      raise JbatError(f"model.arch: expected one of {list(ARCHS)}, got {self.arch!r}")
    if self.arch == "unet":
      if not self.widths or any(not isinstance(w, int) or w <= 0 or w % GROUPS
                                for w in self.widths):
        raise JbatError(f"model.widths: expected positive multiples of {GROUPS}, got "
                        f"{self.widths!r}")
      if self.image_size % self.patch:
        raise JbatError(f"model.patch: {self.patch} does not divide model.image_size "
                        f"{self.image_size}")
      if (self.image_size // self.patch) % 2 ** (len(self.widths) - 1):
        raise JbatError(f"model.widths: {len(self.widths)} levels halve model.image_size / "
                        f"model.patch = {self.image_size // self.patch} "
                        f"{len(self.widths) - 1} times; it must divide")
      if self.widths[-1] % self.n_heads:
        raise JbatError(f"model.n_heads: {self.n_heads} does not divide the lowest "
                        f"level's width {self.widths[-1]}")
      if self.d_model % 2:
        raise JbatError(f"model.d_model: the U-Net needs an even d_model, got {self.d_model}")
      return
    if self.image_size % self.patch:
      raise JbatError(f"model.patch: {self.patch} does not divide model.image_size "
                      f"{self.image_size}")
    if self.d_model % self.n_heads:
      raise JbatError(f"model.n_heads: {self.n_heads} does not divide model.d_model "
                      f"{self.d_model}")

  @property
  def n_tokens(self) -> int:
    return (self.image_size // self.patch) ** 2

  @property
  def null_label(self) -> int:
    """The label of the unconditional (null) token, used for classifier-free guidance."""
    return self.n_classes


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer/float timesteps: f32[B] -> f32[B, dim] (cos | sin)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def patchify(x: jax.Array, p: int) -> jax.Array:
  """f32[B, H, W, C] -> f32[B, (H/p)(W/p), p*p*C] (row-major over patches)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, size: int, c: int) -> jax.Array:
  """Inverse of `patchify`: f32[B, N, p*p*C] -> f32[B, size, size, C]."""
  b = x.shape[0]
  g = size // p
  x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, size, size, c)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nnx.Module):
  """Multi-head self-attention over the N patch tokens (no mask)."""

  def __init__(self, d: int, n_heads: int, *, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.q_proj = nnx.Linear(d, d, rngs=rngs)
    self.k_proj = nnx.Linear(d, d, rngs=rngs)
    self.v_proj = nnx.Linear(d, d, rngs=rngs)
    self.o_proj = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    hd = d // self.n_heads
    split = lambda y: y.reshape(b, n, self.n_heads, hd)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return self.o_proj(out.reshape(b, n, d))


class Block(nnx.Module):
  """One adaLN-Zero transformer block (attention + GELU MLP), see the module docstring."""

  def __init__(self, d: int, n_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.attn = Attention(d, n_heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.fc1 = nnx.Linear(d, d * mlp_ratio, rngs=rngs)
    self.fc2 = nnx.Linear(d * mlp_ratio, d, rngs=rngs)
    # Zero init: every block starts as the identity (DiT's adaLN-Zero).
    self.ada = nnx.Linear(d, 6 * d, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
    s1, sc1, g1, s2, sc2, g2 = jnp.split(self.ada(jax.nn.silu(c)), 6, axis=-1)
    h = h + g1[:, None, :] * self.attn(_modulate(self.norm1(h), s1, sc1))
    mlp = self.fc2(jax.nn.gelu(self.fc1(_modulate(self.norm2(h), s2, sc2))))
    return h + g2[:, None, :] * mlp


class Denoiser(nnx.Module):
  """eps_theta(x_t, t, label, ident): f32[B,H,W,C], int[B] x3 -> predicted noise f32[B,H,W,C]."""

  def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d = cfg.d_model
    self.patch_embed = nnx.Linear(cfg.patch * cfg.patch * cfg.channels, d, rngs=rngs)
    # Unit-scale positions (like DiT's fixed sin-cos table): at 0.02 scale the blocks could not
    # tell the patches apart and the samples came out as independent saturated patches.
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.n_tokens, d)))
    self.time_fc1 = nnx.Linear(d, d, rngs=rngs)
    self.time_fc2 = nnx.Linear(d, d, rngs=rngs)
    # Unit-variance rows: the class vector must be as large as the time embedding (norm ~
    # sqrt(d) and more), or the blocks learn to ignore it (0.02-scaled rows did, here).
    self.class_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.n_classes + 1, d)))
    # Adapter leaf (see the module docstring): zero rows, so "[V] c" == "c" at init.
    self.ident_embed = nnx.LoRAParam(jnp.zeros((cfg.n_identifiers, d), jnp.float32))
    self.blocks = nnx.List([Block(d, cfg.n_heads, cfg.mlp_ratio, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm_out = nnx.LayerNorm(d, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.ada_out = nnx.Linear(d, 2 * d, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.out = nnx.Linear(d, cfg.patch * cfg.patch * cfg.channels,
                          kernel_init=nnx.initializers.zeros, rngs=rngs)

  def condition(self, t: jax.Array, label: jax.Array, ident: jax.Array) -> jax.Array:
    """c = time_mlp(sinusoid(t)) + class_embed[label] + [ident > 0] ident_embed[ident - 1]."""
    d = self.cfg.d_model
    c = self.time_fc2(jax.nn.silu(self.time_fc1(timestep_embedding(t, d))))
    c = c + self.class_embed[...][label]
    ident = ident.astype(jnp.int32)
    rows = self.ident_embed[...][jnp.clip(ident - 1, 0, self.cfg.n_identifiers - 1)]
    return c + jnp.where((ident > 0)[:, None], rows, jnp.zeros_like(rows))

  def __call__(self, x: jax.Array, t: jax.Array, label: jax.Array,
               ident: jax.Array) -> jax.Array:
    cfg = self.cfg
    c = self.condition(t, label, ident)
    h = self.patch_embed(patchify(x, cfg.patch)) + self.pos_embed[...][None]
    for block in self.blocks:
      h = block(h, c)
    shift, scale = jnp.split(self.ada_out(jax.nn.silu(c)), 2, axis=-1)
    h = self.out(_modulate(self.norm_out(h), shift, scale))
    return unpatchify(h, cfg.patch, cfg.image_size, cfg.channels)


# ----------------------------------------------------------------------------- U-Net
#
# A small U-Net (DDPM / ADM style) with the same interface and conditioning as the DiT:
#
#   c = time_mlp(sinusoid(t)) + class_embed[label] + ident_embed[ident - 1] * [ident > 0]
#   h = conv_in(space_to_depth(x, p))     (p = cfg.patch: p x p pixels -> p*p channels)
#   level l = 0..L-1 (resolution S / 2^l, widths[l] channels): ResBlock; skip; downsample
#   middle (S / 2^(L-1)): ResBlock, Attention, ResBlock
#   level l = L-1..0: concat skip; ResBlock (+ Attention at the lowest level); upsample
#   out = depth_to_space(conv_out(silu(GN(h))), p)
#
# The p = 2 stem runs the network at 14 x 14 for 28 x 28 images: a 3x3 convolution at full
# resolution was 3-4x slower per step on a CPU (XLA's CPU convolutions are the bottleneck).
#
#   ResBlock(h, c) = skip(h) + conv2(silu(GN(conv1(silu(GN(h)))) * (1 + scale) + shift)),
#   (shift, scale) = emb_proj(silu(c)).
#
# The conditioning reaches every ResBlock through `emb_proj` (an nnx.Linear) and the
# attention projections are nnx.Linear (q_proj, k_proj, v_proj, o_proj over the pixels of the
# lowest level as tokens), so LoRA targets both with the regex mechanism of jbat.lora.
# conv2 and conv_out start at zero: every ResBlock starts as its skip path.


class ResBlock(nnx.Module):
  """Pre-norm residual block with a FiLM (scale, shift) of the conditioning vector."""

  def __init__(self, c_in: int, c_out: int, d: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(c_in, GROUPS, rngs=rngs)
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), rngs=rngs)
    self.emb_proj = nnx.Linear(d, 2 * c_out, rngs=rngs)
    self.norm2 = nnx.GroupNorm(c_out, GROUPS, rngs=rngs)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.skip = nnx.Conv(c_in, c_out, (1, 1), rngs=rngs) if c_in != c_out else None

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    scale, shift = jnp.split(self.emb_proj(jax.nn.silu(c)), 2, axis=-1)
    h = self.norm2(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = self.conv2(jax.nn.silu(h))
    return (x if self.skip is None else self.skip(x)) + h


class SpatialAttention(nnx.Module):
  """Residual self-attention over the H*W positions of a feature map (GroupNorm first)."""

  def __init__(self, c: int, n_heads: int, *, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(c, GROUPS, rngs=rngs)
    self.attn = Attention(c, n_heads, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x + self.attn(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x: f32[B, H, W, C] -> f32[B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nnx.Module):
  """eps/v-network F(x_t, t, label, ident) as a U-Net; same call signature as `DiT`."""

  def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d, ws = cfg.d_model, cfg.widths
    self.time_fc1 = nnx.Linear(d, d, rngs=rngs)
    self.time_fc2 = nnx.Linear(d, d, rngs=rngs)
    self.class_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.n_classes + 1, d)))
    self.ident_embed = nnx.LoRAParam(jnp.zeros((cfg.n_identifiers, d), jnp.float32))
    pc = cfg.patch * cfg.patch * cfg.channels
    self.conv_in = nnx.Conv(pc, ws[0], (3, 3), rngs=rngs)
    self.down = nnx.List([ResBlock(ws[max(i - 1, 0)], w, d, rngs=rngs)
                          for i, w in enumerate(ws)])
    self.downsample = nnx.List([nnx.Conv(w, w, (3, 3), strides=(2, 2), rngs=rngs)
                                for w in ws[:-1]])
    self.mid1 = ResBlock(ws[-1], ws[-1], d, rngs=rngs)
    self.mid_attn = SpatialAttention(ws[-1], cfg.n_heads, rngs=rngs)
    self.mid2 = ResBlock(ws[-1], ws[-1], d, rngs=rngs)
    self.up = nnx.List([ResBlock(2 * w, w, d, rngs=rngs) for w in ws])
    self.up_attn = SpatialAttention(ws[-1], cfg.n_heads, rngs=rngs)
    self.upsample = nnx.List([nnx.Conv(ws[i + 1], ws[i], (3, 3), rngs=rngs)
                              for i in range(len(ws) - 1)])
    self.norm_out = nnx.GroupNorm(ws[0], GROUPS, rngs=rngs)
    self.conv_out = nnx.Conv(ws[0], pc, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)

  condition = Denoiser.condition

  def __call__(self, x: jax.Array, t: jax.Array, label: jax.Array,
               ident: jax.Array) -> jax.Array:
    cfg = self.cfg
    c = self.condition(t, label, ident)
    g = cfg.image_size // cfg.patch
    h = self.conv_in(patchify(x, cfg.patch).reshape(x.shape[0], g, g, -1))
    skips = []
    n = len(self.cfg.widths)
    for i in range(n):
      h = self.down[i](h, c)
      skips.append(h)
      if i < n - 1:
        h = self.downsample[i](h)
    h = self.mid2(self.mid_attn(self.mid1(h, c)), c)
    for i in reversed(range(n)):
      h = self.up[i](jnp.concatenate([h, skips[i]], axis=-1), c)
      if i == n - 1:
        h = self.up_attn(h)
      if i > 0:
        h = self.upsample[i - 1](_upsample(h))
    h = self.conv_out(jax.nn.silu(self.norm_out(h)))
    return unpatchify(h.reshape(x.shape[0], g * g, -1), cfg.patch, cfg.image_size, cfg.channels)


def make_denoiser(cfg: DenoiserConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The denoiser of `cfg.arch`: `Denoiser` (DiT) or `UNet`."""
  cfg.validate()
  return UNet(cfg, rngs=rngs) if cfg.arch == "unet" else Denoiser(cfg, rngs=rngs)
