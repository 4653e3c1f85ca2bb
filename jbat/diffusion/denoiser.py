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

  def validate(self) -> None:
    for name in ("image_size", "channels", "patch", "d_model", "depth", "n_heads",
                 "mlp_ratio", "n_classes", "n_identifiers"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise JbatError(f"model.{name}: expected a positive integer, got {v!r}")
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
