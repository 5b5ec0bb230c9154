"""Verification pairs over held-out procedural identities (evaluate/pairs.py)."""

import json

import numpy as np
import pytest

from vigface_jax.data import faces
from vigface_jax.evaluate import pairs
from vigface_jax.evaluate import verification

SPEC = pairs.PairSpec(seed=3, num_pairs=40, num_folds=10, identities_per_fold=6,
                      hard_negative_k=2)


def test_folds_are_balanced_contiguous_and_identity_disjoint():
  items, issame = pairs.make_pairs(SPEC)
  assert items.shape == (80, 2) and issame.shape == (40,)
  per_fold = 4
  fold_ids = []
  for f in range(10):
    same = issame[f * per_fold:(f + 1) * per_fold]
    assert same.sum() == per_fold // 2  # half genuine in every fold
    ids = set(items[2 * f * per_fold:2 * (f + 1) * per_fold, 0].tolist())
    lo = SPEC.identity_offset + f * SPEC.identities_per_fold
    assert ids <= set(range(lo, lo + SPEC.identities_per_fold))
    fold_ids.append(ids)
  for a in range(10):
    for b in range(a + 1, 10):
      assert not fold_ids[a] & fold_ids[b]
  # Every identity is held out: far above any training identity.
  assert items[:, 0].min() >= pairs.HOLDOUT_OFFSET


def test_genuine_pairs_share_identity_and_impostors_are_hard_negatives():
  items, issame = pairs.make_pairs(SPEC)
  a, b = items[0::2], items[1::2]
  assert (a[issame, 0] == b[issame, 0]).all()
  assert (a[issame, 1] != b[issame, 1]).all()  # two different images
  assert (a[~issame, 0] != b[~issame, 0]).all()
  for (ia, _), (ib, _) in zip(a[~issame], b[~issame]):
    fold = (ia - SPEC.identity_offset) // SPEC.identities_per_fold
    ids = SPEC.identity_offset + fold * SPEC.identities_per_fold + np.arange(
        SPEC.identities_per_fold)
    vec = {int(i): faces.identity(SPEC.seed, int(i)).vector.astype(np.float64) for i in ids}
    dists = sorted((float(((vec[int(ia)] - vec[int(j)]) ** 2).sum()), int(j))
                   for j in ids if j != ia)
    assert int(ib) in [j for _, j in dists[:SPEC.hard_negative_k]]


def test_pairs_are_deterministic_and_seeded():
  i1, s1 = pairs.make_pairs(SPEC)
  i2, s2 = pairs.make_pairs(SPEC)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(s1, s2)
  i3, _ = pairs.make_pairs(pairs.PairSpec(**{**SPEC.__dict__, "seed": 4}))
  assert not np.array_equal(i1, i3)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_pairs": 30}, "num_pairs"),
    ({"num_pairs": 0}, "num_pairs"),
    ({"identities_per_fold": 2, "hard_negative_k": 2}, "identities_per_fold"),
])
def test_bad_specs_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    pairs.make_pairs(pairs.PairSpec(**{**SPEC.__dict__, **kwargs}))


def test_write_pairs_round_trips_through_the_safe_loader(tmp_path):
  path = tmp_path / "procedural.bin"
  meta = pairs.write_pairs(path, SPEC, image_format="png")
  images, issame = verification.load_bin(path)
  items, expected_same = pairs.make_pairs(SPEC)
  np.testing.assert_array_equal(issame, expected_same)
  assert images.shape == (80, 112, 112, 3)
  for k in (0, 7, 79):  # PNG is lossless: the pack holds exactly the rendered faces
    ident, index = items[k]
    np.testing.assert_array_equal(images[k], faces.render_face(SPEC.seed, ident, index)[0])
  sidecar = json.loads((tmp_path / "procedural.bin.json").read_text())
  assert sidecar == json.loads(json.dumps(meta))
  assert sidecar["items"] == items.tolist() and sidecar["spec"]["seed"] == 3
