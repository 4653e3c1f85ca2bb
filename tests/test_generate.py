"""`jbat.models.generate`: greedy tokens equal transformers' `generate`, the KV-cache path equals
the no-cache full-forward argmax, padding side does not matter, sampling obeys top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed")
transformers = pytest.importorskip("transformers")

from jbat import lora  # noqa: E402
from jbat.errors import JbatError  # noqa: E402
from jbat.models import generate as G  # noqa: E402
from jbat.models import hf_io  # noqa: E402
from tests.test_hf_io import VOCAB, gpt2_config, llama_config, save_hf  # noqa: E402

PAD = 0
NEW = 8


def _prompts(seed: int = 0, lengths=(5, 2, 7)):
  """Left-padded int prompts [B, P] (ids 3..VOCAB-1, pad 0) and their mask."""
  rng = np.random.default_rng(seed)
  p = max(lengths)
  toks = np.full((len(lengths), p), PAD, np.int64)
  mask = np.zeros((len(lengths), p), bool)
  for b, n in enumerate(lengths):
    toks[b, p - n:] = rng.integers(3, VOCAB, n)
    mask[b, p - n:] = True
  return toks, mask


def _to_right(toks, mask):
  out, m = np.full_like(toks, PAD), np.zeros_like(mask)
  for b in range(len(toks)):
    row = toks[b][mask[b]]
    out[b, :len(row)], m[b, :len(row)] = row, True
  return out, m


def _hf_greedy(model, toks, mask, eos):
  with torch.no_grad():
    seq = model.generate(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask).long(),
                         max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                         pad_token_id=PAD, num_beams=1)
  new = seq[:, toks.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


def _brute_force(model, toks, mask, n_new):
  """Greedy without a cache: the full forward pass over the whole left-padded sequence and the
  argmax of the last real position's logits, n_new times. The sequence lives in a fixed
  [B, P + n_new] buffer (one compile): padding, before the prompt and after the tokens so far,
  is segment 0, which causal attention from the real tokens never reaches."""
  seq, valid, pos = (np.asarray(x) for x in G.left_align(jnp.asarray(toks), jnp.asarray(mask),
                                                           PAD))
  b, p = seq.shape
  grow = lambda x: np.pad(x, ((0, 0), (0, n_new)))
  seq, valid, pos = grow(seq), grow(valid), grow(pos)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, t, q, s: nnx.merge(graphdef, st)(t, q, s))
  out = []
  for i in range(n_new):
    logits = fwd(state, jnp.asarray(seq), jnp.asarray(pos), jnp.asarray(valid.astype(np.int32)))
    nxt = np.argmax(np.asarray(logits)[:, p + i - 1], axis=-1)
    out.append(nxt)
    seq[:, p + i], pos[:, p + i], valid[:, p + i] = nxt, pos[:, p + i - 1] + 1, True
  return np.stack(out, axis=1)


@pytest.mark.parametrize("config", [llama_config, gpt2_config], ids=["llama", "gpt2"])
def test_greedy_matches_transformers_generate(tmp_path, config):
  hf = save_hf(config(), tmp_path / "m")
  model, _ = hf_io.load_causal_lm(tmp_path / "m")
  toks, mask = _prompts()
  ours, lengths = G.generate(model, toks, mask, max_new_tokens=NEW, pad_id=PAD)
  theirs = _hf_greedy(hf, toks, mask, eos=None)
  np.testing.assert_array_equal(np.asarray(ours), theirs)
  assert np.asarray(lengths).tolist() == [NEW] * 3
  # Stop at eos: take a token row 0 emits at step 3 as eos; rows stop after their first eos.
  eos = int(theirs[0, 3])
  ours, lengths = G.generate(model, toks, mask, max_new_tokens=NEW, eos_id=eos, pad_id=PAD)
  theirs = _hf_greedy(hf, toks, mask, eos=eos)
  np.testing.assert_array_equal(np.asarray(ours), theirs)
  assert int(lengths[0]) <= 4 and np.all(np.asarray(ours)[0, int(lengths[0]):] == PAD)
  # Right padding gives the same continuations.
  right, rmask = _to_right(toks, mask)
  np.testing.assert_array_equal(
      np.asarray(G.generate(model, right, rmask, max_new_tokens=NEW, eos_id=eos, pad_id=PAD)[0]),
      np.asarray(ours))


def test_kv_cache_equals_full_forward_argmax_with_lora(tmp_path):
  save_hf(llama_config(), tmp_path / "m")
  model, _ = hf_io.load_causal_lm(tmp_path / "m")
  lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
  key = jax.random.key(1)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRALinear):
      key, sub = jax.random.split(key)
      m.lora_b[...] = 0.5 * jax.random.normal(sub, m.lora_b[...].shape)
  toks, mask = _prompts(seed=3, lengths=(6, 1, 3, 4))
  ours = np.asarray(G.generate(model, toks, mask, max_new_tokens=6)[0])
  np.testing.assert_array_equal(ours, _brute_force(model, toks, mask, 6))


def test_sampling_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(0)
  draw = lambda t, p: np.asarray(G.sample_token(logits, keys, t, p, greedy=False))
  assert set(draw(1.0, 0.7).tolist()) == {0, 1}  # nucleus {0.5, 0.3} reaches 0.7
  assert set(draw(1.0, 0.1).tolist()) == {0}
  assert set(draw(1.0, 1.0).tolist()) == {0, 1, 2, 3}
  frac0 = (draw(0.3, 1.0) == 0).mean()  # low temperature sharpens towards the argmax
  assert frac0 > 0.75 and abs((draw(1.0, 1.0) == 0).mean() - 0.5) < 0.05


def test_sampling_generate_and_errors(tmp_path):
  save_hf(llama_config(), tmp_path / "m")
  model, _ = hf_io.load_causal_lm(tmp_path / "m")
  toks, mask = _prompts()
  greedy = np.asarray(G.generate(model, toks, mask, max_new_tokens=NEW)[0])
  tiny_p = G.generate(model, toks, mask, max_new_tokens=NEW, temperature=1.0, top_p=1e-6,
                      rng=jax.random.key(0))[0]
  np.testing.assert_array_equal(np.asarray(tiny_p), greedy)  # a nucleus of one token
  hot = [np.asarray(G.generate(model, toks, mask, max_new_tokens=NEW, temperature=5.0,
                               rng=jax.random.key(k))[0]) for k in (1, 1, 2)]
  np.testing.assert_array_equal(hot[0], hot[1])  # the same key, the same draw
  assert not np.array_equal(hot[0], hot[2]) and not np.array_equal(hot[0], greedy)
  with pytest.raises(JbatError, match="needs an rng"):
    G.generate(model, toks, mask, max_new_tokens=4, temperature=1.0)
  with pytest.raises(JbatError, match="at least one real token"):
    G.generate(model, toks, np.zeros_like(mask), max_new_tokens=4)
  with pytest.raises(JbatError, match="max_new_tokens"):
    G.generate(model, toks, mask, max_new_tokens=0)
  with pytest.raises(JbatError, match="eos_id 999"):
    G.generate(model, toks, mask, max_new_tokens=2, eos_id=999)
