"""Jitted autoregressive generation for `CausalLM` with a key/value cache.

Prompts come as a padded batch `tokens` [B, P] with `mask` [B, P] (True = real token); each
row's real tokens must be contiguous (left or right padding, or none). Rows are first
left-aligned: row b with n_b real tokens puts them at slots P - n_b .. P - 1 at positions
0 .. n_b - 1, so every row's next token goes to the same cache slot and one
`lax.dynamic_update_slice` per layer writes it.

  prefill   one forward pass over the P prompt slots fills the cache [B, S, K, Dh] per layer
            (S = P + max_new_tokens) and gives the first new token from the last slot;
  decode    a `lax.while_loop`: token g_i goes in at slot P + i, position n_b + i, attends to
            every real prompt slot and every earlier generated slot, and gives g_{i+1}; the loop
            stops after max_new_tokens tokens or when every row has emitted `eos_id`.

Attention, rope and the layers are the model's own submodules (`layer.attn.q_proj`, ...), so a
model with LoRA/DoRA adapters generates through its adapters. A token is chosen greedily
(temperature 0) or sampled from softmax(logits / temperature) restricted to the top-p nucleus
(the smallest set of most likely tokens whose probability reaches top_p). After a row's eos,
its remaining outputs are `pad_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, apply_rope


def left_align(tokens: jax.Array, mask: jax.Array, pad_id: int):
  """(tokens, valid, positions) with each row's contiguous real tokens moved to the end.

  tokens, mask: [B, P]. Returns int tokens [B, P] (pad_id before the prompt), bool valid [B, P]
  and int positions [B, P] (0 .. n_b - 1 on the real tokens, 0 on padding)."""
  p = tokens.shape[1]
  mask = mask.astype(bool)
  n = mask.sum(axis=1, keepdims=True)  # [B, 1]
  first = jnp.argmax(mask, axis=1)[:, None]  # first real slot (0 when none)
  j = jnp.arange(p)[None, :]
  valid = j >= p - n
  src = jnp.clip(first + j - (p - n), 0, p - 1)
  aligned = jnp.where(valid, jnp.take_along_axis(tokens, src, axis=1), pad_id)
  positions = jnp.where(valid, j - (p - n), 0)
  return aligned.astype(jnp.int32), valid, positions.astype(jnp.int32)


def _attend(attn, x, positions, cache, slot, key_mask):
  """Attention of x [B, T, D] (new tokens, written at cache slots slot .. slot + T - 1) over the
  cache; key_mask: bool [B, T, S]. Returns (output [B, T, D], (cache_k, cache_v))."""
  cfg = attn.cfg
  b, t, _ = x.shape
  q = attn.q_proj(x).reshape(b, t, cfg.n_heads, cfg.dh)
  k = attn.k_proj(x).reshape(b, t, cfg.kv_heads, cfg.dh)
  v = attn.v_proj(x).reshape(b, t, cfg.kv_heads, cfg.dh)
  if cfg.pos == "rope":
    q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
    k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
  cache_k, cache_v = cache
  cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, slot, 0, 0))
  cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, slot, 0, 0))
  rep = cfg.n_heads // cfg.kv_heads
  kk, vv = jnp.repeat(cache_k, rep, axis=2), jnp.repeat(cache_v, rep, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk).astype(jnp.float32) / jnp.sqrt(cfg.dh)
  scores = jnp.where(key_mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(vv.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, vv).reshape(b, t, cfg.n_heads * cfg.dh)
  return attn.o_proj(out), (cache_k, cache_v)


def forward_cached(model: CausalLM, tokens, positions, caches, slot, key_mask):
  """Logits [B, V] (float32) of the last of `tokens` [B, T] and the updated caches: the model's
  forward pass with keys/values of earlier slots read from `caches` (one (k, v) pair per layer,
  [B, S, K, Dh] each) and those of `tokens` written at slots slot .. slot + T - 1."""
  cfg = model.cfg
  x = model.embed(tokens)
  if cfg.pos == "learned":
    x = x + model.pos_embed(positions)
  new = []
  for layer, cache in zip(model.layers, caches):
    h, cache = _attend(layer.attn, layer.attn_norm(x), positions, cache, slot, key_mask)
    x = x + h
    x = x + layer.mlp(layer.mlp_norm(x))
    new.append(cache)
  x = model.final_norm(x[:, -1])
  logits = model.embed.attend(x) if cfg.tie_embeddings else model.lm_head(x)
  return logits.astype(jnp.float32), new


def sample_token(logits: jax.Array, rng: jax.Array, temperature, top_p, greedy: bool):
  """int32 [B] from float32 logits [B, V]: argmax when `greedy`, else a draw from
  softmax(logits / temperature) restricted to the top-p nucleus (the most likely token is always
  kept; tokens tied with the nucleus' least likely one are kept too)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # a prefix, never empty
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy"))
def _generate(graphdef, state, tokens, mask, rng, temperature, top_p, eos_id, pad_id, *,
              max_new, greedy):
  """eos_id: int32 scalar, -1 for none (no token id matches it); pad_id: int32 scalar."""
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, p = tokens.shape
  s = p + max_new
  toks, valid, positions = left_align(tokens, mask, pad_id)
  n = valid.sum(axis=1).astype(jnp.int32)
  dt = jnp.dtype(cfg.dtype)
  caches = [(jnp.zeros((b, s, cfg.kv_heads, cfg.dh), dt), jnp.zeros((b, s, cfg.kv_heads, cfg.dh),
                                                                    dt))
            for _ in range(cfg.n_layers)]
  slots = jnp.arange(s)
  key_ok = jnp.concatenate([valid, jnp.ones((b, max_new), bool)], axis=1)  # [B, S]
  # Prefill: query slot i sees key slots j <= i that hold real tokens (padding sees itself).
  causal = slots[None, :] <= jnp.arange(p)[:, None]  # [P, S]
  self_ = slots[None, :] == jnp.arange(p)[:, None]
  prefill_mask = causal[None] & (key_ok[:, None, :] | self_[None])
  logits, caches = forward_cached(model, toks, positions, caches, 0, prefill_mask)
  rng, sub = jax.random.split(rng)
  first = sample_token(logits, sub, temperature, top_p, greedy)
  done = first == eos_id
  out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, done, _, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, prev, done, out, caches, rng = carry
    slot = p + i - 1  # where `prev` (generated token i - 1) goes
    key_mask = (key_ok & (slots[None, :] <= slot))[:, None, :]  # [B, 1, S]
    pos = (n + i - 1)[:, None]
    logits, caches = forward_cached(model, prev[:, None], pos, caches, slot, key_mask)
    rng, sub = jax.random.split(rng)
    tok = sample_token(logits, sub, temperature, top_p, greedy)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    done = done | (tok == eos_id)
    return i + 1, tok, done, out, caches, rng

  carry = (jnp.asarray(1, jnp.int32), first, done, out, caches, rng)
  _, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
  is_eos = out == eos_id  # lengths: generated tokens up to and including the first eos
  lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new)
  return out, lengths.astype(jnp.int32)


def generate(model: CausalLM, tokens, mask=None, *, max_new_tokens: int,
             eos_id: int | None = None, pad_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues each prompt row of `tokens` [B, P] (`mask` [B, P]: True on the real, contiguous
  tokens; default all True) by up to `max_new_tokens` tokens.

  temperature 0: greedy (argmax); > 0: sampling with top-p (needs `rng`). Generation stops at
  max_new_tokens or once every row has produced `eos_id`. Returns (new tokens int32
  [B, max_new_tokens], pad_id after a row's eos; lengths int32 [B]: tokens up to and including
  the first eos). The model may carry LoRA/DoRA adapters. One compile per (graph, shapes,
  max_new_tokens, greedy or not); eos_id, pad_id, temperature and top_p are traced.

  Raises JbatError for max_new_tokens < 1, a prompt row with no real token, prompts + new
  tokens longer than a learned-position model's max_len, temperature < 0, top_p outside
  (0, 1], or sampling without `rng`.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise JbatError(f"generate: tokens must be [batch, length], got shape {tokens.shape}")
  mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
  if mask.shape != tokens.shape:
    raise JbatError(f"generate: mask shape {mask.shape} != tokens shape {tokens.shape}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise JbatError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not bool(jnp.all(mask.any(axis=1))):
    raise JbatError("generate: every prompt row needs at least one real token")
  if model.cfg.pos == "learned" and tokens.shape[1] + max_new_tokens > model.cfg.max_len:
    raise JbatError(f"generate: prompt length {tokens.shape[1]} + max_new_tokens "
                    f"{max_new_tokens} exceeds the model's max_len {model.cfg.max_len}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise JbatError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, "
                    f"{top_p}")
  greedy = temperature == 0
  if not greedy and rng is None:
    raise JbatError("generate: sampling (temperature > 0) needs an rng key")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  if eos_id is not None and not 0 <= int(eos_id) < model.cfg.vocab_size:
    raise JbatError(f"generate: eos_id {eos_id} is not a token id of the model")
  return _generate(graphdef, state, tokens, mask, rng, jnp.float32(max(temperature, 1e-6)),
                   jnp.float32(top_p), jnp.int32(-1 if eos_id is None else int(eos_id)),
                   jnp.int32(pad_id), max_new=max_new_tokens, greedy=greedy)
