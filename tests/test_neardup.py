"""Near-duplicate filtering (jbat.data.neardup): normalisation, planted near-duplicates found,
far documents kept, and the MinHash/LSH answer equal to the brute-force one."""

import numpy as np

from jbat.data import neardup

SOURCE = [
    "Ebola outbreak: how the virus spreads between patients in West Africa",
    "Why a good night's sleep matters more than you think for your heart",
    "Hospital waiting times in England reach their highest level in a decade",
    "New test can spot pancreatic cancer years before symptoms appear",
]


def test_normalise_strips_prefixes_urls_case_and_punctuation():
  n = neardup.normalise
  assert n("RT @bbchealth: VIDEO: Ebola, the facts! http://bbc.in/1xYz") == "ebola the facts"
  assert n("AUDIO: Sleep matters (bbc.co.uk/news)") == "sleep matters"
  assert n("MT @nhs IN PICTURES: The NHS at 70") == "the nhs at 70"
  assert n("Video: how it works") == "video how it works"  # Only upper-case prefixes go.
  assert n("Mt Everest: the climb") == "mt everest the climb"  # RT/MT only before @user.
  assert neardup.shingles("ab") == {"ab"} and neardup.shingles("!!") == set()


def test_planted_near_duplicates_dropped_far_ones_kept():
  planted = [
      "VIDEO: " + SOURCE[0],
      "RT @bbchealth: " + SOURCE[1].upper() + " http://bbc.in/abc",
      SOURCE[2].replace(" ", ", ").lower() + "!!!",
      SOURCE[3].replace("years", "months"),  # One word changed: still >= 0.6.
  ]
  far = [
      "Ebola vaccine trial begins in Guinea with thousands of volunteers",  # Same topic.
      "Why exercise matters",
      "Pancreatic cancer: what you need to know",
      "A completely unrelated sentence about football and the weather",
      "",
  ]
  pool = far[:2] + planted + far[2:]
  res = neardup.near_duplicates(pool, SOURCE)
  want = np.array([p in planted for p in pool])
  assert (res.drop == want).all() and res.dropped == len(planted)
  assert (neardup.brute_force(pool, SOURCE) == want).all()
  for p in planted:
    assert max(neardup.jaccard(neardup.shingles(p), neardup.shingles(s)) for s in SOURCE) >= 0.6
  for p in far:
    assert max(neardup.jaccard(neardup.shingles(p), neardup.shingles(s)) for s in SOURCE) < 0.6


def test_lsh_equals_brute_force_over_a_range_of_similarities():
  rng = np.random.default_rng(0)
  words = "cancer heart sleep virus hospital patients study risk drug test diet child".split()
  evaluation = [" ".join(rng.choice(words, size=8)) for _ in range(30)]
  pool = []
  for _ in range(300):  # Copies of evaluation texts with 0-5 words replaced: all similarities.
    w = str(rng.choice(evaluation)).split()
    for i in rng.choice(len(w), size=int(rng.integers(0, 6)), replace=False):
      w[i] = str(rng.choice(words))
    pool.append(" ".join(w))
  exact = neardup.brute_force(pool, evaluation)
  assert 0 < exact.sum() < len(pool)  # Both sides of the threshold are exercised.
  res = neardup.near_duplicates(pool, evaluation, chunk_docs=64)
  assert (res.drop == exact).all()


def test_covered_share_and_signatures_against_brute_force():
  texts = ["abcdefgh abcdefgh", "xyz", "", "hello world hello"]
  h, starts = neardup.gram_hashes(texts)
  ev_h, _ = neardup.gram_hashes(["abcdefgh zzz", "hello"])
  share = neardup.covered_share(h, starts, np.unique(ev_h))
  ev = neardup.shingles("abcdefgh zzz") | neardup.shingles("hello")
  for t, s in zip(texts, share):
    a = neardup.shingles(t)
    assert s == (len(a & ev) / len(a) if a else 0.0)
  sig = neardup.signatures(texts, num_perm=16)
  assert sig.shape == (4, 16) and (sig[2] == np.iinfo(np.uint64).max).all()
  same = neardup.signatures(["ABCDEFGH, abcdefgh!"], num_perm=16)
  assert (same[0] == sig[0]).all()  # Equal shingle sets, equal signatures.
