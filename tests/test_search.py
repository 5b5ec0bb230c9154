"""`generate/search.py`: exact top-k by inner product against a float32 numpy brute force,
padding rows never returned, deterministic ties, and the gallery really sharded over 8 devices."""

from __future__ import annotations

import conftest
import jax.numpy as jnp
import numpy as np
import pytest

from vigface_jax import ops
from vigface_jax.generate import search


def _unit(rng, n, d):
  return ops.l2_normalize_np(rng.normal(size=(n, d)).astype(np.float32))


def _brute(q, g, k):
  s = q @ g.T
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: ties in increasing index
  return np.take_along_axis(s, idx, 1), idx


def test_rescored_search_equals_float32_brute_force_with_ragged_chunks():
  rng = np.random.default_rng(0)
  g, q = _unit(rng, 1003, 64), _unit(rng, 517, 64)  # neither a multiple of any chunk
  sims, idx = search.nearest(q, g, k=5, query_chunk=128, gallery_chunk=100)
  ref_s, ref_i = _brute(q, g, 5)
  assert sims.shape == idx.shape == (517, 5)
  assert sims.dtype == np.float32 and idx.dtype == np.int64
  np.testing.assert_array_equal(idx, ref_i)
  np.testing.assert_allclose(sims, ref_s, atol=1e-6, rtol=0)
  assert (np.diff(sims, axis=1) <= 0).all()


def test_bfloat16_without_rescoring_differs_only_at_near_ties():
  rng = np.random.default_rng(1)
  g, q = _unit(rng, 700, 64), _unit(rng, 300, 64)
  sims, idx = search.nearest(q, g, k=1, rescore=False, query_chunk=64)
  ref_s, ref_i = _brute(q, g, 1)
  s32 = q @ g.T
  picked = np.take_along_axis(s32, idx, 1)
  # Where bfloat16 picked another row, that row is within bfloat16 rounding of the best.
  assert (ref_s - picked).max() < 1e-2
  assert (idx == ref_i).mean() > 0.9
  np.testing.assert_allclose(sims, picked, atol=2e-2)  # unrescored sims are bf16 products


def test_clear_margins_give_exact_top1_and_a_planted_duplicate_scores_one():
  rng = np.random.default_rng(2)
  g = _unit(rng, 257, 32)
  target = rng.permutation(257)[:40]
  q = g[target] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32)
  q[7] = g[target[7]] * 3.0  # an exact duplicate (up to scale) of a gallery row
  sims, idx = search.nearest(q, g * 2.0, k=1, normalize=True, rescore=False)
  np.testing.assert_array_equal(idx[:, 0], target)  # bf16 alone suffices with clear margins
  sims, idx = search.nearest(q, g * 2.0, k=1, normalize=True)
  assert idx[7, 0] == target[7]
  assert abs(sims[7, 0] - 1.0) < 1e-6


def test_padding_rows_are_never_returned_even_when_they_would_win():
  rng = np.random.default_rng(3)
  g = np.abs(_unit(rng, 13, 16)) + 0.1  # all in the positive orthant
  q = -np.ones((5, 16), np.float32)     # every real similarity is negative; a zero pad scores 0
  searcher = search.Searcher(g, gallery_chunk=4, margin=0)
  assert searcher.gallery.shape[0] == search.padded_rows(13, 1, 4) == 16
  sims, idx = searcher(q, k=13)
  assert (sims < 0).all()
  for row in idx:
    assert sorted(row.tolist()) == list(range(13))
  np.testing.assert_allclose(sims, _brute(q, g, 13)[0], atol=1e-5)


def test_ties_resolve_to_the_lowest_gallery_index():
  rng = np.random.default_rng(4)
  base = _unit(rng, 6, 16)
  g = np.concatenate([base, base, base])  # rows i, i+6, i+12 identical
  sims, idx = search.nearest(base, g, k=3, gallery_chunk=8)
  for i in range(6):
    assert idx[i].tolist() == [i, i + 6, i + 12], idx[i]
  s2, i2 = search.nearest(base, g, k=3, gallery_chunk=8, rescore=False)
  np.testing.assert_array_equal(i2, idx)


def test_two_stage_selection_equals_top_k_ties_included():
  """The grouped selection against `lax.top_k` on scores with heavy ties (small integers),
  whole groups of -inf (padding) and k near the group count; a variant that forgets to put the
  chosen groups back in row order is caught (the control)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  rows = 8 * search.GROUP
  s = rng.integers(0, 6, size=(64, rows)).astype(np.float32)
  s[:8, -2 * search.GROUP:] = -np.inf
  s[8:16] = 3.0  # every entry tied
  for k in (1, 2, 5):
    assert search._two_stage(rows, k) == (4 * k <= 8)
    want_v, want_p = jax.lax.top_k(jnp.asarray(s), k)
    got_v, got_p = search._two_stage_top_k(jnp.asarray(s), k)
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(got_p), np.asarray(want_p))

  def unsorted_groups(x, k):  # the planted fault: candidates in group-score order
    n = x.shape[0]
    _, groups = jax.lax.top_k(x.reshape(n, -1, search.GROUP).max(axis=2), k)
    pos = (groups[:, :, None] * search.GROUP + jnp.arange(search.GROUP)).reshape(n, -1)
    v, p = jax.lax.top_k(jnp.take_along_axis(x, pos, axis=1), k)
    return v, jnp.take_along_axis(pos, p, axis=1)

  ramp = np.tile(np.repeat(np.arange(8, 0, -1), search.GROUP)[::-1], (4, 1)).astype(np.float32)
  ramp[:, :search.GROUP] = 8.0       # group 0 ties group 7's entries ...
  ramp[:, 7 * search.GROUP + 5] = 9.0  # ... but group 7 holds the best one
  want_p = np.asarray(jax.lax.top_k(jnp.asarray(ramp), 2)[1])
  assert (np.asarray(search._two_stage_top_k(jnp.asarray(ramp), 2)[1]) == want_p).all()
  assert (np.asarray(unsorted_groups(jnp.asarray(ramp), 2)[1]) != want_p).any()


def test_searcher_on_the_two_stage_path_with_query_tiles_and_duplicates():
  rng = np.random.default_rng(9)
  g = _unit(rng, 2500, 32)
  g[1500:1600] = g[100:200]  # duplicates: ties broken by the lower gallery index
  q = np.concatenate([g[150:182], _unit(rng, 200, 32)])
  searcher = search.Searcher(g, query_chunk=128, query_tile=48)
  assert searcher.platform == "cpu" and searcher.gallery_chunk % search.GROUP == 0
  assert search._two_stage(searcher.gallery_chunk, 1 + search.DEFAULT_MARGIN)
  for rescore in (True, False):
    searcher.rescore = rescore
    sims, idx = searcher(q, k=3)
    assert idx[:32, 0].tolist() == list(range(150, 182))
    assert idx[:32, 1].tolist() == list(range(1550, 1582))
    if rescore:  # a true top 3 up to float32 summation order (the brute force's ties differ)
      ref_s, _ = _brute(q, g, 3)
      np.testing.assert_allclose(sims, ref_s, atol=1e-6, rtol=0)
      np.testing.assert_allclose(np.take_along_axis(q @ g.T, idx, 1), ref_s, atol=1e-6)
  plain = search.Searcher(g, query_chunk=128, gallery_chunk=100)  # the one-stage path
  assert not search._two_stage(plain.gallery_chunk, 1 + search.DEFAULT_MARGIN)
  searcher.rescore = True
  np.testing.assert_array_equal(plain(q, k=3)[1], searcher(q, k=3)[1])


def test_float32_products_and_fewer_queries_than_a_chunk():
  rng = np.random.default_rng(5)
  g, q = _unit(rng, 50, 8), _unit(rng, 3, 8)
  sims, idx = search.nearest(q, g, k=50, dtype=jnp.float32, rescore=False)
  ref_s, ref_i = _brute(q, g, 50)
  np.testing.assert_array_equal(idx, ref_i)
  np.testing.assert_allclose(sims, ref_s, atol=1e-5)
  empty_s, empty_i = search.nearest(q[:0], g, k=2)
  assert empty_s.shape == empty_i.shape == (0, 2)


def test_bad_arguments_name_themselves():
  g = np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match="query_tile=0"):
    search.Searcher(g, query_tile=0)
  with pytest.raises(ValueError, match="k=5"):
    search.nearest(g, g, k=5)
  with pytest.raises(ValueError, match="queries: dimension 3"):
    search.nearest(np.ones((2, 3)), g)
  with pytest.raises(ValueError, match="gallery: row 1"):
    search.nearest(g, np.asarray([[0.0] * 8, [np.nan] * 8]))
  with pytest.raises(ValueError, match="gallery: expected a 2-D"):
    search.nearest(g, np.ones(8))


_SCRIPT = r"""
import numpy as np
import jax
from jax.sharding import Mesh
from vigface_jax import ops
from vigface_jax.generate import search

assert jax.device_count() == 8
rng = np.random.default_rng(0)
g = ops.l2_normalize_np(rng.normal(size=(1003, 48)).astype(np.float32))
q = ops.l2_normalize_np(rng.normal(size=(301, 48)).astype(np.float32))
q[5] = g[777]  # a planted duplicate
sharded = search.Searcher(g, gallery_chunk=40, query_chunk=64)
m_pad = search.padded_rows(1003, 8, 40)
assert sharded.gallery.shape == (m_pad, 48) and m_pad % 8 == 0, sharded.gallery.shape
shards = sharded.gallery.addressable_shards
assert len({s.device for s in shards}) == 8
assert all(s.data.shape == (m_pad // 8, 48) for s in shards), [s.data.shape for s in shards]
assert all(s.data.shape == (m_pad // 8,) for s in sharded.row_ids.addressable_shards)
one = search.Searcher(g, mesh=Mesh(np.asarray(jax.devices()[:1]), ("gallery",)),
                      gallery_chunk=40, query_chunk=64)
assert len(one.gallery.addressable_shards) == 1
for rescore in (True, False):
  sharded.rescore = one.rescore = rescore
  a_s, a_i = sharded(q, k=4)
  b_s, b_i = one(q, k=4)
  np.testing.assert_array_equal(a_i, b_i)
  np.testing.assert_array_equal(a_s, b_s)
assert a_i.max() < 1003
ref = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :4]
sharded.rescore = True
a_s, a_i = sharded(q, k=4)
np.testing.assert_array_equal(a_i, ref)
assert a_i[5, 0] == 777 and abs(a_s[5, 0] - 1.0) < 1e-6
# A 2-D mesh shards the gallery over both axes, with the same answer.
grid = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
two = search.Searcher(g, mesh=grid, gallery_chunk=40, query_chunk=64)
assert all(s.data.shape == (m_pad // 8, 48) for s in two.gallery.addressable_shards)
np.testing.assert_array_equal(two(q, k=4)[1], ref)
print("OK")
"""


def test_gallery_sharded_over_8_devices_gives_the_single_device_result():
  conftest.run_on_fake_devices(_SCRIPT, num_devices=8, timeout=240)
