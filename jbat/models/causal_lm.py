"""A decoder-only causal language model in flax.nnx (GPT-2 and Llama/Qwen2 families).

One config dataclass and the modules, nothing else: weight loading lives in `hf_io.py`.

Shapes: B batch, T sequence, D = d_model, H = n_heads, K = n_kv_heads, Dh = head_dim, V = vocab.

  h_0     = embed(tokens) [+ pos_embed(positions)]                      [B, T, D]
  h_l+1   = h_l + attn(attn_norm(h_l));  h_l+1 += mlp(mlp_norm(h_l+1))  (pre-norm blocks)
  logits  = final_norm(h_L) @ E^T   (tied)   or   lm_head(final_norm(h_L))  [B, T, V], float32

Attention is softmax(q k^T / sqrt(Dh) + mask) v per head, where query i may see key j iff
j <= i (array order) and segment_ids[i] == segment_ids[j]. Parameters are always float32;
activations are computed in `cfg.dtype` with the softmax and the logits in float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jbat.errors import JbatError

_INIT = nnx.initializers.normal(stddev=0.02)
_ZEROS = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Architecture of `CausalLM`. Defaults give a GPT-2-like model; see `llama_like`."""

  vocab_size: int
  max_len: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  n_kv_heads: int | None = None  # None -> n_heads (MHA); fewer -> grouped-query attention.
  head_dim: int | None = None  # None -> d_model // n_heads.
  pos: str = "learned"  # "learned" (GPT-2) | "rope" (Llama).
  rope_theta: float = 10000.0
  # None | ("linear", factor) | ("llama3", factor, low_freq_factor, high_freq_factor,
  # original_max_len): rescales the rope frequencies as in HF (see `rope_inv_freq`).
  rope_scaling: tuple | None = None
  norm: str = "layernorm"  # "layernorm" | "rmsnorm".
  norm_eps: float = 1e-5
  mlp: str = "gelu"  # "gelu" (fc1/fc2, tanh-approximate gelu as GPT-2) | "swiglu".
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Bias on q/k/v projections (GPT-2 and Qwen2: yes).
  bias: bool = True  # Bias on o_proj, MLP linears and LayerNorm (GPT-2: yes, Llama: no).
  dtype: str = "float32"  # Compute dtype: "float32" | "bfloat16". Params are always float32.
  # Rematerialise each block in the backward pass (jax.checkpoint): activation memory O(1) blocks
  # instead of O(n_layers), for about one extra forward pass. Same values either way.
  remat: bool = False
  # The model-level losses (jbat.losses) of this model run over vocabulary chunks of this many
  # rows instead of holding [B, T, V] logits; None: full logits. Same values up to float
  # rounding; memory O(B T vocab_chunk) instead of O(B T V).
  vocab_chunk: int | None = None
  # The training loss (jbat.losses.lm_loss) over groups of this many rows, each rematerialised
  # in the backward pass: activation memory of grad_rows rows, not the batch's. None: the batch.
  grad_rows: int | None = None

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def dh(self) -> int:
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  def validate(self) -> None:
    """Raises JbatError naming the offending `model.<field>` for any inconsistent value."""
    for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise JbatError(f"model.{name}: expected a positive integer, got {getattr(self, name)!r}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise JbatError(f"model.d_model: {self.d_model} is not divisible by model.n_heads "
                      f"{self.n_heads} (or set model.head_dim)")
    if self.head_dim is not None and self.head_dim <= 0:
      raise JbatError(f"model.head_dim: expected a positive integer, got {self.head_dim}")
    if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
      raise JbatError(f"model.n_kv_heads: {self.n_kv_heads} must be positive and divide "
                      f"model.n_heads {self.n_heads}")
    if self.pos not in ("learned", "rope"):
      raise JbatError(f"model.pos: expected 'learned' or 'rope', got {self.pos!r}")
    if self.pos == "rope" and self.dh % 2:
      raise JbatError(f"model.head_dim: rope needs an even head dim, got {self.dh}")
    if self.norm not in ("layernorm", "rmsnorm"):
      raise JbatError(f"model.norm: expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
    if self.mlp not in ("gelu", "swiglu"):
      raise JbatError(f"model.mlp: expected 'gelu' or 'swiglu', got {self.mlp!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise JbatError(f"model.dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")
    sc = self.rope_scaling
    if sc is not None and not (
        (len(sc) == 2 and sc[0] == "linear" and sc[1] > 0)
        or (len(sc) == 5 and sc[0] == "llama3" and sc[1] > 0 and sc[4] > 0
            and 0 < sc[2] < sc[3])):
      raise JbatError(f"model.rope_scaling: expected None, ('linear', factor) or ('llama3', "
                      f"factor, low_freq_factor < high_freq_factor, original_max_len), got {sc!r}")
    if self.norm_eps <= 0 or self.rope_theta <= 0:
      raise JbatError("model.norm_eps and model.rope_theta must be positive")

  @classmethod
  def gpt2_like(cls, vocab_size: int, max_len: int = 1024, d_model: int = 768,
                n_layers: int = 12, n_heads: int = 12, **kw) -> "LMConfig":
    """GPT-2: learned positions, LayerNorm, gelu MLP (4x), biases everywhere, tied embeddings."""
    kw = dict(d_ff=4 * d_model, qkv_bias=True, bias=True, **kw)
    return cls(vocab_size, max_len, d_model, n_layers, n_heads, **kw)

  @classmethod
  def llama_like(cls, vocab_size: int, max_len: int = 2048, d_model: int = 512,
                 n_layers: int = 8, n_heads: int = 8, **kw) -> "LMConfig":
    """Llama: rope, RMSNorm (eps 1e-6 here; override with norm_eps), SwiGLU, no biases, untied."""
    kw = dict(dict(d_ff=int(8 * d_model / 3), pos="rope", norm="rmsnorm", norm_eps=1e-6,
                   mlp="swiglu", tie_embeddings=False, qkv_bias=False, bias=False), **kw)
    return cls(vocab_size, max_len, d_model, n_layers, n_heads, **kw)


def _linear(cfg: LMConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, kernel_init=_INIT, bias_init=_ZEROS, rngs=rngs)


def _norm(cfg: LMConfig, rngs: nnx.Rngs) -> nnx.Module:
  dt = jnp.dtype(cfg.dtype)
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, rngs=rngs)
  return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=dt, rngs=rngs)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] on the last axis (the half-split rotary convention of HF Llama)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rope_inv_freq(dh: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """Rope frequencies w_i = theta^(-2i/Dh), i < Dh/2, float32 [Dh/2], optionally rescaled:

  ("linear", f):                 w / f  (positions interpolated f times).
  ("llama3", f, lo, hi, L):      with wavelength lam = 2 pi / w: w if lam < L / hi; w / f if
                                 lam > L / lo; else (1 - s) w / f + s w,
                                 where s = (L / lam - lo) / (hi - lo).
  """
  inv_freq = theta ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
  if scaling is None:
    return inv_freq
  if scaling[0] == "linear":
    return inv_freq / scaling[1]
  _, factor, lo, hi, orig_len = scaling
  wavelen = 2 * jnp.pi / inv_freq
  s = (orig_len / wavelen - lo) / (hi - lo)
  smooth = (1 - s) * inv_freq / factor + s * inv_freq
  return jnp.where(wavelen < orig_len / hi, inv_freq,
                   jnp.where(wavelen > orig_len / lo, inv_freq / factor, smooth))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: tuple | None = None) -> jax.Array:
  """Rotary embedding: x * cos(p w) + rotate_half(x) * sin(p w), w = rope_inv_freq(Dh, theta,
  scaling).

  x: [B, T, H, Dh]; positions: int [B, T]. Pair (i, i + Dh/2) is rotated by angle p * w_i, so
  <rope(q, m), rope(k, n)> depends on m - n only. Angles are computed in float32.
  """
  dh = x.shape[-1]
  inv_freq = rope_inv_freq(dh, theta, scaling)  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
  x32 = x.astype(jnp.float32)
  return (x32 * jnp.cos(angles) + rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head / grouped-query self-attention (kv heads repeated H/K times)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h, k, dh = cfg.n_heads, cfg.kv_heads, cfg.dh
    self.q_proj = _linear(cfg, cfg.d_model, h * dh, cfg.qkv_bias, rngs)
    self.k_proj = _linear(cfg, cfg.d_model, k * dh, cfg.qkv_bias, rngs)
    self.v_proj = _linear(cfg, cfg.d_model, k * dh, cfg.qkv_bias, rngs)
    self.o_proj = _linear(cfg, h * dh, cfg.d_model, cfg.bias, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, T, D]; positions: [B, T]; mask: bool [B, 1, T, T] (True = may attend)."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.dh)
    k = self.k_proj(x).reshape(b, t, cfg.kv_heads, cfg.dh)
    v = self.v_proj(x).reshape(b, t, cfg.kv_heads, cfg.dh)
    if cfg.pos == "rope":
      q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
      k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
    rep = cfg.n_heads // cfg.kv_heads  # q head h uses kv head h // rep (HF repeat_kv order).
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(cfg.dh)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.n_heads * cfg.dh)
    return self.o_proj(out)


class MLP(nnx.Module):
  """gelu: fc2(gelu(fc1 x)).  swiglu: down_proj(silu(gate_proj x) * up_proj x)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    if cfg.mlp == "gelu":
      self.fc1 = _linear(cfg, cfg.d_model, cfg.d_ff, cfg.bias, rngs)
      self.fc2 = _linear(cfg, cfg.d_ff, cfg.d_model, cfg.bias, rngs)
    else:
      self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, cfg.bias, rngs)
      self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, cfg.bias, rngs)
      self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, cfg.bias, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "gelu":
      return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm transformer block: x += attn(attn_norm x); x += mlp(mlp_norm x)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


class CausalLM(nnx.Module):
  """Token ids -> next-token logits. Submodule names are relied on by `hf_io` and `lora`."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    dt = jnp.dtype(cfg.dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, embedding_init=_INIT, rngs=rngs)
    if cfg.pos == "learned":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, dtype=dt, embedding_init=_INIT,
                                 rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _linear(cfg, cfg.d_model, cfg.vocab_size, False, rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens, positions, segment_ids: int [B, T] -> float32 logits [B, T, V].

    positions default to arange(T) per row (learned positions must be < max_len: not checked
    under jit). segment_ids (packing): a query sees only keys of its own segment; padding
    (segment 0) attends to padding only, so no row is fully masked and outputs stay finite.
    """
    x = self.hidden_states(tokens, positions, segment_ids)
    logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)

  def output_embedding(self) -> jax.Array:
    """The unembedding as [V, D] (float32 parameters): logits = hidden_states @ W^T.

    Tied: the token embedding; untied: lm_head's kernel transposed. Raises JbatError when
    lm_head is not a plain linear (e.g. wrapped by LoRA), whose logits are not h @ W^T.
    """
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...]
    if not isinstance(self.lm_head, nnx.Linear):
      raise JbatError("model.lm_head is not a plain nnx.Linear (LoRA on lm_head?): the "
                      "vocabulary-chunked loss needs logits = h @ W^T; set vocab_chunk=0 "
                      "(config: model.vocab_chunk=-1)")
    return self.lm_head.kernel[...].T

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states [B, T, D] in cfg.dtype (the logits are these times the
    unembedding, see `output_embedding`); arguments as `__call__`."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # [1, 1, T, T]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    x = self.embed(tokens)
    if self.cfg.pos == "learned":
      x = x + self.pos_embed(positions)
    for layer in self.layers:
      if self.cfg.remat:  # jax.checkpoint of the block as a pure function of its state.
        gdef, state = nnx.split(layer)
        x = jax.checkpoint(lambda st, h: nnx.merge(gdef, st)(h, positions, mask))(state, x)
      else:
        x = layer(x, positions, mask)
    return self.final_norm(x)


def storage_dtype(param_dtype: str) -> np.dtype:
  """numpy dtype the weights are stored in (`load_causal_lm(param_dtype=...)`): float32 or
  bfloat16; JbatError for anything else."""
  if param_dtype not in ("float32", "bfloat16"):
    raise JbatError(f"param_dtype: expected 'float32' or 'bfloat16', got {param_dtype!r}")
  return np.dtype(jnp.bfloat16) if param_dtype == "bfloat16" else np.dtype(np.float32)
