"""Tokenizers: a small byte-level BPE trained on the corpus, or an existing local HF tokenizer.

Special tokens are `<pad>`, `<bos>`, `<eos>` with ids 0, 1, 2 in a trained tokenizer. Byte-level
means every string round-trips exactly (decode(encode(s)) == s) and there is no unknown token.
Training is deterministic for a given (texts, vocab_size), so the cache key is a hash of both.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jbat.errors import JbatError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = SPECIAL_TOKENS


def _wrap(tok: tokenizers.Tokenizer) -> transformers.PreTrainedTokenizerFast:
  """Wraps a `tokenizers.Tokenizer` with pad/bos/eos set to the jbat special tokens.

  The wrapper is marked `jbat_bpe = True`: examples get jbat's `[bos] text [eos]` framing
  (`jbat.data.formats.default_framing`)."""
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS
  )
  wrapped.jbat_bpe = True
  return wrapped


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, path: str | os.PathLike
) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer and saves it atomically as `path` (a tokenizer.json).

  The vocabulary is the 3 special tokens (ids 0..2), the 256 byte symbols, then merges until
  `vocab_size` entries.

  Raises:
    JbatError: vocab_size too small to hold the special tokens and the byte alphabet.
  """
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
    raise JbatError(
        f"tokenizer vocab_size must be >= {len(SPECIAL_TOKENS) + len(alphabet)} (3 special "
        f"tokens + 256 bytes), got {vocab_size}."
    )
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=alphabet,
      min_frequency=2,
      show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return load_tokenizer(path)


def _from_file(path: pathlib.Path) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # noqa: BLE001  a Rust exception type (not OSError / ValueError).
    raise JbatError(f"{path}: not a valid tokenizer.json ({' '.join(str(e).split())[:300]})"
                    ) from None


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
  """Loads a tokenizer from a tokenizer.json file, or a folder holding one / an HF tokenizer.

  A folder with tokenizer_config.json is loaded with `AutoTokenizer(local_files_only=True)`
  (nothing is downloaded). pad/bos/eos are guaranteed set: missing pad falls back to eos, and
  missing bos falls back to eos.

  Raises:
    JbatError: the path does not exist or holds no tokenizer.
  """
  path = pathlib.Path(path)
  if path.is_file():
    tok = _wrap(_from_file(path))
  elif path.is_dir() and (path / "tokenizer_config.json").is_file():
    try:
      tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001  tokenizers raises its own (Rust) exception types.
      raise JbatError(f"cannot load the HF tokenizer in {path}: "
                      f"{' '.join(str(e).split())[:300]}") from None
  elif path.is_dir() and (path / "tokenizer.json").is_file():
    tok = _wrap(_from_file(path / "tokenizer.json"))
  else:
    raise JbatError(
        f"no tokenizer at {path}: expected a tokenizer.json file, or a folder holding "
        f"tokenizer.json or an HF tokenizer (tokenizer_config.json)."
    )
  if tok.eos_token is None:
    raise JbatError(f"tokenizer at {path} defines no eos token.")
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  if tok.bos_token is None:
    tok.bos_token = tok.eos_token
  return tok


def tokenizer_cache_key(texts: Iterable[str], vocab_size: int) -> str:
  """sha256 over vocab_size and the length-prefixed texts (order matters), first 16 hex chars."""
  h = hashlib.sha256(f"bpe-v1:{vocab_size}:".encode())
  for text in texts:
    data = text.encode("utf-8", errors="replace")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()[:16]


def get_or_train_tokenizer(
    texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike
) -> transformers.PreTrainedTokenizerFast:
  """Returns the cached tokenizer for (texts, vocab_size), training and saving it if absent.

  Cache file: cache_dir/tokenizer-<key>.json with key = `tokenizer_cache_key`.
  """
  texts = list(texts)
  path = pathlib.Path(cache_dir) / f"tokenizer-{tokenizer_cache_key(texts, vocab_size)}.json"
  if path.is_file():
    return load_tokenizer(path)
  return train_bpe_tokenizer(texts, vocab_size, path)
