"""Throughput of the near-duplicate filter (jbat.data.neardup) on tweet-like texts.

  python benchmarks/near_dup.py [n_pool] [n_eval]      # defaults 200000 400

Texts: 8-16 words drawn from a Zipf-distributed vocabulary of 20,000 random lower-case words
(~80 characters, like the health tweets), plus a URL host on a third of them; 1% of the pool
are near-copies of evaluation texts ("VIDEO:" prefix, case, punctuation, a word changed).
Prints pool documents per CPU second (signatures, banding and exact verification) and checks that
every planted near-copy was found.
"""

import sys
import time

import numpy as np

from jbat.data import neardup


def texts(n: int, rng: np.random.Generator, vocab: list[str]) -> list[str]:
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  out = []
  for _ in range(n):
    words = [vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(8, 17)), p=p)]
    out.append(" ".join(words) + (" bbc.in" if rng.random() < 0.33 else ""))
  return out


def main(n_pool: int = 200_000, n_eval: int = 400) -> None:
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(20_000)]
  evaluation = texts(n_eval, rng, vocab)
  pool = texts(n_pool, rng, vocab)
  planted = rng.choice(n_pool, size=n_pool // 100, replace=False)
  for i in planted:
    src = evaluation[int(rng.integers(n_eval))]
    pool[i] = "VIDEO: " + src.upper().replace(" ", ", ", 1) + "!"
  t0, c0 = time.perf_counter(), time.process_time()
  res = neardup.near_duplicates(pool, evaluation)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  print(f"{n_pool:,} pool x {n_eval} evaluation texts: {dt:.1f} s wall, {cpu:.1f} s CPU, "
        f"{n_pool / cpu:,.0f} pool documents per CPU second; {res.dropped:,} dropped "
        f"({len(planted):,} planted), "
        f"{res.candidate_pairs:,} candidate pairs verified")
  assert res.drop[planted].all()


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
