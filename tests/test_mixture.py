"""Tests for jbat.data.mixture: BAT batches mixing adaptation and backbone examples."""

import collections

import numpy as np
import pytest

from jbat.data import mixture, pipeline
from jbat.errors import JbatError

PAD, L = 0, 8
PIPELINE_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids", "id", "valid")


def _examples(n, first_id, rng):
  out = []
  for i in range(n):
    k = int(rng.integers(2, L + 3))  # some longer than L + 1: truncated
    out.append({"id": first_id + i, "ids": rng.integers(3, 50, size=k).astype(np.int32)})
  return out


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  return _examples(11, 0, rng), _examples(17, 1000, rng)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys, keys=None):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in keys or x.keys():
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_rows_per_source_and_lam(data):
  adapt, backbone = data
  B, rho, lam = 8, 0.4, 0.25  # round(3.2) = 3 backbone rows, 5 adaptation rows
  batches = _take(mixture.mixture_loader(adapt, backbone, B, L, PAD, 7, rho=rho, lam=lam), 12)
  by_id = {ex["id"]: ex for ex in adapt + backbone}
  for b in batches:
    assert b["source"].dtype == np.int8 and b["source"].shape == (B,)
    np.testing.assert_array_equal(b["source"], [0] * 5 + [1] * 3)
    assert b["valid"].all()
    assert all(i < 1000 for i in b["id"][:5]) and all(i >= 1000 for i in b["id"][5:])
    # Each row is pad_batch of its example, with the weights of backbone rows times lam.
    ref = pipeline.pad_batch([by_id[int(i)] for i in b["id"]], B, L, PAD)
    for k in PIPELINE_KEYS:
      if k != "weights":
        np.testing.assert_array_equal(b[k], ref[k], err_msg=k)
    np.testing.assert_allclose(b["weights"][:5], ref["weights"][:5])
    np.testing.assert_allclose(b["weights"][5:], lam * ref["weights"][5:])
    assert b["weights"].dtype == np.float32


def test_streams_are_epoch_shuffles(data):
  adapt, backbone = data
  # 5 adaptation rows and 3 backbone rows per batch; 40 batches hold 18 whole adaptation
  # epochs (of 11) and 7 whole backbone epochs (of 17).
  it = mixture.mixture_loader(adapt, backbone, 8, L, PAD, 1, rho=3 / 8)
  batches = _take(it, 40)
  a_ids = np.concatenate([b["id"][:5] for b in batches])
  b_ids = np.concatenate([b["id"][5:] for b in batches])
  epochs_a = a_ids[: 18 * 11].reshape(18, 11)
  epochs_b = b_ids[: 7 * 17].reshape(7, 17)
  assert all(sorted(e) == list(range(11)) for e in epochs_a)
  assert all(sorted(e) == list(range(1000, 1017)) for e in epochs_b)
  assert len({tuple(e) for e in epochs_a}) > 1  # reshuffled per epoch
  assert len({tuple(e) for e in epochs_b}) > 1
  # Independent streams: the adaptation part equals a plain loader with the same seed.
  plain = _take(pipeline.train_loader(adapt, 5, L, PAD, 1), 40)
  np.testing.assert_array_equal(a_ids, np.concatenate([p["id"] for p in plain]))


def test_rho_zero_equals_train_loader(data):
  adapt, backbone = data
  want = _take(pipeline.train_loader(adapt, 4, L, PAD, 3), 9)
  for bb in (backbone, [], None):
    got = _take(mixture.mixture_loader(adapt, bb, 4, L, PAD, 3, rho=0.0, lam=5.0), 9)
    _assert_batches_equal(got, want, PIPELINE_KEYS)
    assert all((g["source"] == 0).all() and g["source"].dtype == np.int8 for g in got)


def test_sharded_streams_are_disjoint(data):
  adapt, backbone = data
  seen = collections.Counter()
  for shard in range(2):
    it = mixture.mixture_loader(adapt, backbone, 4, L, PAD, 0, rho=0.5, shard_index=shard,
                                shard_count=2)
    ids = {int(i) for b in _take(it, 30) for i in b["id"]}
    seen.update(ids)
  assert set(seen) == {ex["id"] for ex in adapt + backbone}
  assert all(c == 1 for c in seen.values())


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_resume_reproduces_batches(data, rho):
  adapt, backbone = data
  make = lambda: mixture.mixture_loader(adapt, backbone, 6, L, PAD, 11, rho=rho, lam=0.5)
  reference = _take(make(), 25)
  for k in (0, 3, 17):
    it = make()
    _take(it, k)
    text = pipeline.state_to_json(it.get_state())  # JSON round trip, as in checkpoints
    fresh = make()
    fresh.set_state(pipeline.state_from_json(text))
    _assert_batches_equal(_take(fresh, 25 - k), reference[k:])


def test_state_mismatch_and_bad_state(data):
  adapt, backbone = data
  with_bb = mixture.mixture_loader(adapt, backbone, 4, L, PAD, 0, rho=0.5)
  without = mixture.mixture_loader(adapt, backbone, 4, L, PAD, 0, rho=0.0)
  with pytest.raises(JbatError, match="saved without a backbone stream"):
    with_bb.set_state(without.get_state())
  with pytest.raises(JbatError, match="not a mixture-loader state"):
    with_bb.set_state({"next_example": 3})


def test_reselection_phase_keeps_adapt_position(data):
  """A later phase's loader (new backbone list) continues the adaptation stream where the
  earlier phase's state left it, and starts its own backbone stream from the beginning."""
  adapt, backbone = data
  make = lambda bb, phase=0: mixture.mixture_loader(  # noqa: E731
      adapt, bb, 6, L, PAD, 11, rho=0.5, phase=phase)
  reference = _take(make(backbone), 9)
  it = make(backbone)
  _take(it, 4)
  state = pipeline.state_from_json(pipeline.state_to_json(it.get_state()))
  new_list = backbone[::-1][:13]
  later = make(new_list, phase=1)
  later.set_state(state)
  got = _take(later, 5)
  fresh = _take(make(new_list, phase=1), 5)
  n_a = mixture.split_rows(6, 0.5)[0]
  for g, r, f in zip(got, reference[4:], fresh):
    for k in PIPELINE_KEYS:
      np.testing.assert_array_equal(g[k][:n_a], r[k][:n_a], err_msg=k)
      np.testing.assert_array_equal(g[k][n_a:], f[k][n_a:], err_msg=k)
  # The phase-1 backbone stream has its own seed: not the phase-0 order of the same list.
  phase0 = _take(make(new_list), 5)
  assert any((a["id"][n_a:] != b["id"][n_a:]).any() for a, b in zip(phase0, fresh))
  # Its own state resumes it exactly; an earlier phase's loader refuses a later state.
  it1 = make(new_list, phase=1)
  _take(it1, 2)
  resumed = make(new_list, phase=1)
  resumed.set_state(it1.get_state())
  _assert_batches_equal(_take(resumed, 3), _take(it1, 3))
  with pytest.raises(JbatError, match="phase 1"):
    make(backbone).set_state(later.get_state())
  # States saved before phases existed (no "phase" key) are phase 0.
  old = dict(it.get_state())
  del old["phase"]
  again = make(backbone)
  again.set_state(old)
  _assert_batches_equal(_take(again, 5), reference[4:])


def test_split_rows():
  assert mixture.split_rows(16, 0.5) == (8, 8)
  assert mixture.split_rows(10, 0.25) == (8, 2)  # round(2.5) = 2
  assert mixture.split_rows(5, 0.0) == (5, 0)
  assert mixture.backbone_seed(0) != 0 and mixture.backbone_seed(0) != mixture.backbone_seed(1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rho": -0.1}, r"rho .* must be in \[0, 1\)"),
        ({"rho": 1.0}, r"rho .* must be in \[0, 1\)"),
        ({"rho": 0.05}, "too small for rho=0.05"),  # round(0.2) = 0 backbone rows
        ({"rho": 0.9}, "too small for rho=0.9"),  # round(3.6) = 4: no adaptation row
        ({"rho": 0.5, "lam": -1.0}, "lam .* must be a finite number >= 0"),
        ({"rho": 0.5, "lam": float("nan")}, "lam .* must be a finite number >= 0"),
    ],
)
def test_errors(data, kwargs, match):
  adapt, backbone = data
  with pytest.raises(JbatError, match=match):
    mixture.mixture_loader(adapt, backbone, 4, L, PAD, 0, **kwargs)


def test_error_no_backbone_examples(data):
  adapt, _ = data
  for empty in ([], None):
    with pytest.raises(JbatError, match="no backbone examples"):
      mixture.mixture_loader(adapt, empty, 4, L, PAD, 0, rho=0.5)
  with pytest.raises(JbatError, match="dataset is empty"):
    mixture.mixture_loader([], [], 4, L, PAD, 0, rho=0.0)
