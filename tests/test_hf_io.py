"""Parity of `jbat.models.hf_io` with transformers' PyTorch models (tiny random configs).

Each test saves a random transformers model with `save_pretrained` (safetensors) and compares
logits on random ids against the jbat model loaded by `load_causal_lm` (max abs diff < 1e-4).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers")

from jbat.errors import JbatError  # noqa: E402
from jbat.models import hf_io  # noqa: E402

VOCAB = 48
TOL = 1e-4


def make_tokenizer(n_tokens: int = 40) -> transformers.PreTrainedTokenizerFast:
  """A WordLevel tokenizer with `n_tokens` entries: <pad>, <bos>, <eos>, <unk>, w4, w5, ..."""
  import tokenizers
  from tokenizers import models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"])}
  vocab.update({f"w{i}": i for i in range(4, n_tokens)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>")


def gpt2_config(**kw):
  kw = dict(dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                 eos_token_id=2, initializer_range=0.1), **kw)
  return transformers.GPT2Config(**kw)


def llama_config(**kw):
  kw = dict(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, initializer_range=0.1), **kw)
  return transformers.LlamaConfig(**kw)


def qwen2_config(**kw):
  kw = dict(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2, initializer_range=0.1), **kw)
  return transformers.Qwen2Config(**kw)


def save_hf(config, path: pathlib.Path, seed: int = 0, tokenizer=None, **save_kw):
  """Random transformers model (biases and norms randomised too) saved to `path`; returns it."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path), safe_serialization=True, **save_kw)
  (tokenizer or make_tokenizer()).save_pretrained(str(path))
  return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(seed: int = 1, shape=(2, 12)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, size=shape)


def assert_parity(ref_model, path, ids=None):
  ids = random_ids() if ids is None else ids
  model, tok = hf_io.load_causal_lm(path)
  ours = np.asarray(model(jnp.asarray(ids)))
  ref = torch_logits(ref_model, ids)
  assert ours.shape == ref.shape
  np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)
  return model, tok


@pytest.mark.parametrize("name,config", [
    ("gpt2", lambda: gpt2_config()),
    ("gpt2_untied", lambda: gpt2_config(tie_word_embeddings=False)),
    ("llama_gqa", lambda: llama_config()),
    ("llama_tied", lambda: llama_config(tie_word_embeddings=True)),
    ("llama_bias", lambda: llama_config(attention_bias=True, mlp_bias=True)),
    ("llama_head_dim", lambda: llama_config(head_dim=16)),
    ("qwen2", lambda: qwen2_config()),
    ("qwen2_tied", lambda: qwen2_config(tie_word_embeddings=True)),
])
def test_logits_match_transformers(tmp_path, name, config):
  cfg = config()
  ref = save_hf(cfg, tmp_path)
  model, tok = assert_parity(ref, tmp_path)
  assert model.cfg.tie_embeddings == cfg.tie_word_embeddings
  assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
  assert len(tok) == 40


def test_config_mapping_llama():
  cfg = hf_io.config_from_hf(llama_config().to_dict())
  assert (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
  assert (cfg.n_heads, cfg.kv_heads, cfg.dh, cfg.rope_theta) == (4, 2, 8, 500.0)
  assert (cfg.qkv_bias, cfg.bias, cfg.norm_eps) == (False, False, 1e-6)
  old_style = {**llama_config().to_dict(), "rope_parameters": None, "rope_theta": 123.0,
               "rope_scaling": None}
  assert hf_io.config_from_hf(old_style).rope_theta == 123.0


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_scaled_rope_matches_transformers(tmp_path, rope):
  ref = save_hf(llama_config(rope_scaling=dict(rope, rope_theta=500.0)), tmp_path)
  model, _ = assert_parity(ref, tmp_path, random_ids(shape=(2, 40)))
  assert model.cfg.rope_scaling[0] == rope["rope_type"]


def test_unsupported_rope_type(tmp_path):
  hf = {**llama_config().to_dict(), "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
  with pytest.raises(JbatError, match="rope_type 'yarn'.*default, linear, llama3"):
    hf_io.config_from_hf(hf)


def test_sharded_checkpoint_loads_same(tmp_path):
  ref = save_hf(llama_config(), tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  assert_parity(ref, tmp_path)


def test_load_on_mesh_places_params(tmp_path):
  save_hf(llama_config(), tmp_path)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model, _ = hf_io.load_causal_lm(tmp_path, mesh=mesh)
  kernel = model.layers[0].attn.q_proj.kernel[...]
  assert kernel.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def test_bfloat16_checkpoint(tmp_path):
  ref = save_hf(qwen2_config(), tmp_path)
  ref.to(torch.bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
  model, _ = hf_io.load_causal_lm(tmp_path)
  ref = ref.float()  # Same bf16-rounded weights, float32 compute on both sides.
  ids = random_ids()
  np.testing.assert_array_less(
      np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(ref, ids)).max(), TOL)


@pytest.mark.parametrize("model_type,config", [
    ("gpt2", lambda: gpt2_config()),
    ("llama", lambda: llama_config()),
    ("qwen2", lambda: qwen2_config(tie_word_embeddings=True)),
])
def test_save_round_trip_through_transformers(tmp_path, model_type, config):
  save_hf(config(), tmp_path / "src")
  model, tok = hf_io.load_causal_lm(tmp_path / "src")
  out = hf_io.save_causal_lm(model, tok, tmp_path / "out")
  assert json.loads((out / "config.json").read_text())["model_type"] == model_type
  back = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
  ids = random_ids(2)
  np.testing.assert_array_less(
      np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(back.eval(), ids)).max(), TOL)
  tok2 = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  assert tok2("w5 w7")["input_ids"] == tok("w5 w7")["input_ids"]
  again, _ = hf_io.load_causal_lm(out)  # And jbat reads its own output.
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))),
                                np.asarray(model(jnp.asarray(ids))))


# --- bad inputs ---------------------------------------------------------------------------------


def test_unsupported_model_type_lists_supported(tmp_path):
  save_hf(llama_config(), tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
  with pytest.raises(JbatError, match=r"'mistral'.*supported model types: gpt2, llama, qwen2"):
    hf_io.load_causal_lm(tmp_path)


def _rewrite_weights(path: pathlib.Path, edit) -> None:
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
  save_hf(llama_config(), tmp_path)
  _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(JbatError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    hf_io.load_causal_lm(tmp_path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
  save_hf(gpt2_config(), tmp_path)

  def edit(t):
    t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :100]
  _rewrite_weights(tmp_path, edit)
  with pytest.raises(JbatError, match=r"'transformer.h.0.mlp.c_fc.weight' has shape "
                                      r"\(32, 100\), expected \(32, 128\)"):
    hf_io.load_causal_lm(tmp_path)


def test_index_naming_missing_shard(tmp_path):
  save_hf(llama_config(), tmp_path, max_shard_size="20KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(JbatError, match=rf"names shard '{shard.name}', which is missing"):
    hf_io.load_causal_lm(tmp_path)


def test_tokenizer_larger_than_embedding(tmp_path):
  save_hf(llama_config(), tmp_path, tokenizer=make_tokenizer(VOCAB + 5))
  with pytest.raises(JbatError, match=rf"tokenizer has {VOCAB + 5} tokens .* only {VOCAB} rows"):
    hf_io.load_causal_lm(tmp_path)


def test_no_config(tmp_path):
  with pytest.raises(JbatError, match="no config.json"):
    hf_io.load_causal_lm(tmp_path)
