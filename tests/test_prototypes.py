"""Tests for the stage-1 prototype report (`evaluate/prototypes.py`) against brute-force numpy."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from vigface_jax.evaluate import prototypes

_RES = 2.0 / prototypes.HIST_BINS  # histogram bin width


def _normalise(rows):
  rows = np.asarray(rows, np.float64)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _brute(rows, n):
  """Reference: full float64 cosine matrix over `[C, d]` rows."""
  x = _normalise(rows)
  c = x.shape[0]
  sim = np.clip(x @ x.T, -1.0, 1.0)
  iu = np.triu_indices(c, 1)
  pair_i, pair_j = iu
  vals = sim[iu]
  ri, rj = pair_i < n, pair_j < n
  groups = {"real_real": vals[ri & rj], "virtual_virtual": vals[~ri & ~rj],
            "virtual_real": vals[ri != rj]}
  masked = sim.copy()
  np.fill_diagonal(masked, -np.inf)
  near_real_idx = masked[:, :n].argmax(axis=1) if n else None
  near_real_cos = masked[:, :n].max(axis=1) if n else None
  return groups, masked.argmax(axis=1), masked.max(axis=1), near_real_idx, near_real_cos


@pytest.mark.parametrize("n,k,block", [(40, 25, 4096), (40, 25, 7), (30, 0, 8), (1, 12, 5)])
def test_matches_brute_force(n, k, block):
  rng = np.random.default_rng(n + k)
  rows = rng.normal(size=(n + k, 16)).astype(np.float32)
  got = prototypes.separability(rows.T, n, block=block)  # [d, C], the margin head's layout
  groups, near_idx, near_cos, near_real_idx, near_real_cos = _brute(rows, n)

  for name, vals in groups.items():
    stats = got[name]
    assert stats["pairs"] == vals.size
    if vals.size == 0:
      assert stats["max"] is None and stats["mean"] is None and stats["p99"] is None
      continue
    np.testing.assert_allclose(stats["max"], vals.max(), atol=1e-6)
    np.testing.assert_allclose(stats["mean"], vals.mean(), atol=1e-6)
    for q in prototypes.PERCENTILES:
      key = prototypes._pname(q)
      assert abs(stats[key] - np.percentile(vals, q)) <= _RES + 1e-6, (name, q)

  per_row = got["per_row"]
  np.testing.assert_array_equal(per_row["nearest_index"], near_idx)
  np.testing.assert_allclose(per_row["nearest_cosine"], near_cos, atol=1e-6)
  if n >= 2:
    np.testing.assert_array_equal(per_row["nearest_real_index"], near_real_idx)
    np.testing.assert_allclose(per_row["nearest_real_cosine"], near_real_cos, atol=1e-6)
    ref_real = near_real_cos[:n]
    np.testing.assert_allclose(got["nearest_real_to_real"]["p50"], np.median(ref_real),
                               atol=1e-6)
    np.testing.assert_allclose(got["nearest_real_to_real"]["max"], ref_real.max(), atol=1e-6)
  else:
    # The only real row has no other real row; virtual rows all point at it.
    assert per_row["nearest_real_index"][0] == -1
    assert np.isnan(per_row["nearest_real_cosine"][0])
    np.testing.assert_array_equal(per_row["nearest_real_index"][n:], 0)
    assert got["verdict"]["passed"] is None
  if k:
    ref_virt = near_real_cos[n:]
    np.testing.assert_allclose(got["nearest_real_to_virtual"]["p99"],
                               np.percentile(ref_virt, 99), atol=1e-6)
    np.testing.assert_allclose(got["nearest_real_to_virtual"]["mean"], ref_virt.mean(),
                               atol=1e-6)


def test_block_size_does_not_change_result():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(8, 50)).astype(np.float32)
  one = prototypes.separability(centres, 20, block=1000)
  many = prototypes.separability(centres, 20, block=3)
  for key in ("virtual_real", "virtual_virtual", "real_real", "nearest_real_to_virtual",
              "nearest_real_to_real", "verdict"):
    for stat, val in one[key].items():
      if isinstance(val, float):
        np.testing.assert_allclose(many[key][stat], val, atol=1e-6, err_msg=f"{key}.{stat}")
      else:
        assert many[key][stat] == val, (key, stat)
  for name, arr in one["per_row"].items():
    np.testing.assert_allclose(many["per_row"][name], arr, atol=1e-6, err_msg=name)


def test_class_axis_zero_is_transpose():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(8, 30)).astype(np.float32)
  a = prototypes.separability(centres, 10)
  b = prototypes.separability(centres.T, 10, class_axis=0)
  assert a["virtual_real"] == b["virtual_real"]
  np.testing.assert_array_equal(a["per_row"]["nearest_index"], b["per_row"]["nearest_index"])


def _orthogonal_case(n=12, k=6, dim=24, seed=5):
  """Real rows in the first half of the dimensions, virtual rows in the second half."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((n + k, dim), np.float32)
  rows[:n, :dim // 2] = rng.normal(size=(n, dim // 2))
  rows[n:, dim // 2:] = rng.normal(size=(k, dim // 2))
  return rows


def test_orthogonal_virtual_rows_pass():
  rows = _orthogonal_case()
  got = prototypes.separability(rows, 12, class_axis=0)
  assert abs(got["virtual_real"]["max"]) < 1e-6
  assert abs(got["virtual_real"]["mean"]) < 1e-6
  assert abs(got["nearest_real_to_virtual"]["max"]) < 1e-6
  verdict = got["verdict"]
  assert verdict["passed"] is True
  assert verdict["virtual_nearest_real_p99"] < verdict["real_nearest_real_median"]


def test_real_span_says_where_virtual_rows_live():
  """Virtual rows outside the real rows' span (what a stage-2 DiT trained on real rows never
  saw) read near 0 inside; the control, virtual rows mixed from real ones, near 1."""
  rows = _orthogonal_case(n=40, k=10, dim=24)
  span = prototypes.separability(rows, 40, class_axis=0, block=7)["real_span"]
  assert span["embed_dim"] == 24 and span["energies"] == [0.9, 0.99]
  assert span["real_dims"][0] <= span["real_dims"][1] <= 12
  assert span["real_dims"][1] >= 10  # 40 Gaussian rows in 12 dims fill most of them
  assert span["virtual_energy_inside"] < 1e-6
  mixed = rows.copy()
  mixed[40:] = np.random.default_rng(1).normal(size=(10, 40)) @ rows[:40]
  span = prototypes.separability(mixed, 40, class_axis=0)["real_span"]
  assert span["virtual_energy_inside"] > 0.9
  iso = np.random.default_rng(2).normal(size=(200, 24))
  assert prototypes.real_span(iso / np.linalg.norm(iso, axis=1, keepdims=True),
                              200)["real_dims"][1] >= 20


def test_projection_to_the_real_span_keeps_only_the_trained_part():
  """Virtual rows = a part inside the real rows' 6-d span + noise outside it: the projection
  returns exactly the inside part, renormalised; rows with nothing inside are refused."""
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
  inside, outside = basis[:, :6], basis[:, 6:]
  real = _normalise(rng.normal(size=(50, 6)) @ inside.T)
  part = rng.normal(size=(9, 6)) @ inside.T
  virtual = _normalise(part + 3.0 * rng.normal(size=(9, 10)) @ outside.T)
  got, directions = prototypes.project_to_real_span(virtual, real, 0.99)
  dims = directions.shape[1]
  assert 5 <= dims <= 6  # 99% of 6 isotropic directions' energy
  assert got.shape == virtual.shape and got.dtype == np.float32
  if dims == 6:
    np.testing.assert_allclose(got, _normalise(part), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  # The control: before, most of each row's energy was outside; after, none is.
  assert np.mean(np.sum((virtual @ outside) ** 2, axis=1)) > 0.7
  assert np.max(np.abs(got @ outside)) < 1e-5
  for energy in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match="energy"):
      prototypes.project_to_real_span(virtual, real, energy)
  with pytest.raises(ValueError, match="virtual row 1 has no energy"):
    prototypes.project_to_real_span(np.stack([virtual[0], outside[:, 0]]), real, 0.99)


def test_relaxation_moves_rows_away_from_real_ones_inside_the_span():
  """Rows start near real rows (a planted near-copy among them); relaxing lowers every row's
  nearest-real cosine, keeps them unit length and inside the span; 0 steps changes nothing."""
  rng = np.random.default_rng(3)
  real = np.zeros((60, 10))
  real[:, :5] = rng.normal(size=(60, 5))
  real = _normalise(real)
  virtual = np.zeros((20, 10))
  virtual[:, :5] = rng.normal(size=(20, 5))
  virtual[0] = real[7] + 0.01 * virtual[0]  # a near-copy of real row 7
  virtual = _normalise(virtual)
  np.testing.assert_allclose(prototypes.relax_in_span(virtual, real, 0), virtual, atol=1e-6)
  got = prototypes.relax_in_span(virtual, real, 200)
  before, after = (virtual @ real.T).max(axis=1), (got @ real.T).max(axis=1)
  assert before[0] > 0.99 and after[0] < 0.9
  assert after.max() < before.max() and after.mean() < before.mean() - 0.05
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got[:, 5:], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="steps"):
    prototypes.relax_in_span(virtual, real, -1)


def test_shaping_gives_rows_the_real_rows_energy_profile():
  """Real rows with most energy in 2 of 6 directions (78%), isotropic rows (a third there):
  shaped, the rows hold twice the isotropic share there, stay unit and in the span;
  rows shaped like isotropic real rows are unchanged; a row along unused directions fails."""
  rng = np.random.default_rng(4)
  basis = np.linalg.qr(rng.normal(size=(12, 12)))[0][:, :6]
  weights = np.array([4.0, 4.0, 1.0, 1.0, 1.0, 1.0])
  real = _normalise((rng.normal(size=(400, 6)) * weights) @ basis.T)
  rows = _normalise(rng.normal(size=(300, 6)) @ basis.T)
  share = lambda x: np.mean(np.sum((x @ basis[:, :2]) ** 2, axis=1))
  got = prototypes.shape_like_real(rows, real, basis)
  assert share(real) > 0.75 and share(rows) < 0.4 and share(got) > 0.65
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got - (got @ basis) @ basis.T, 0.0, atol=1e-6)
  flat = _normalise(np.linalg.qr(rng.normal(size=(6, 6)))[0] @ basis.T)  # equal rms everywhere
  np.testing.assert_allclose(prototypes.shape_like_real(rows, flat, basis), rows, atol=1e-5)
  sparse = np.zeros((3, 6))
  sparse[:, :2] = rng.normal(size=(3, 2))
  unused = np.zeros((2, 6))
  unused[:, 2:] = rng.normal(size=(2, 4))  # only where the real rows have nothing
  with pytest.raises(ValueError, match="row 0 has no energy"):
    prototypes.shape_like_real(_normalise(unused @ basis.T), _normalise(sparse @ basis.T),
                               basis)


def test_duplicated_real_row_fails():
  rows = _orthogonal_case()
  rows[15] = 3.0 * rows[4]  # virtual row 15 is real row 4 (scale is irrelevant)
  got = prototypes.separability(rows.T, 12)
  assert got["per_row"]["nearest_real_index"][15] == 4
  np.testing.assert_allclose(got["per_row"]["nearest_real_cosine"][15], 1.0, atol=1e-6)
  np.testing.assert_allclose(got["virtual_real"]["max"], 1.0, atol=1e-6)
  np.testing.assert_allclose(got["nearest_real_to_virtual"]["max"], 1.0, atol=1e-6)
  assert got["verdict"]["passed"] is False
  assert (got["verdict"]["virtual_nearest_real_p99"]
          > got["verdict"]["real_nearest_real_median"])


def test_no_virtual_rows():
  rng = np.random.default_rng(6)
  got = prototypes.separability(rng.normal(size=(8, 10)), 10)
  assert got["num_virtual"] == 0
  assert got["virtual_real"]["pairs"] == 0 and got["virtual_real"]["max"] is None
  assert got["virtual_virtual"]["pairs"] == 0
  assert got["real_real"]["pairs"] == 45
  assert got["nearest_real_to_virtual"]["rows"] == 0
  assert got["verdict"]["passed"] is None and "virtual" in got["verdict"]["reason"]


def test_write_report(tmp_path):
  rows = _orthogonal_case(n=40, k=30, dim=32)
  report = prototypes.write_report(tmp_path, rows.T, 40, sample=50)
  assert report["verdict"]["passed"] is True

  with np.load(tmp_path / "prototypes.npz") as npz:
    assert npz["real"].shape == (40, 32) and npz["virtual"].shape == (30, 32)
    assert npz["real"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(npz["virtual"], axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(npz["nearest_real_index"],
                                  report["per_row"]["nearest_real_index"])

  with open(tmp_path / "separability.json") as f:
    saved = json.load(f)
  assert "per_row" not in saved
  assert saved["verdict"]["passed"] is True
  assert saved["num_real"] == 40 and saved["num_virtual"] == 30

  png = tmp_path / "prototype_similarity.png"
  with Image.open(png) as image:
    image.load()
    assert image.format == "PNG"
    assert 300 <= image.width <= 2000 and 300 <= image.height <= 2000


def test_figure_with_real_rows_only(tmp_path):
  rng = np.random.default_rng(7)
  path = os.path.join(tmp_path, "fig.png")
  prototypes.similarity_figure(rng.normal(size=(8, 20)), 20, path, sample=256)
  with Image.open(path) as image:
    assert image.size[0] > 100


def test_row_span_benchmark_on_a_tiny_stage1(tiny_stage_runs, tmp_path):
  """`benchmarks/row_span.py` on a finished stage 1: the same span as the prototypes, features
  of faces mostly inside it; a missing export folder is named."""
  from benchmarks import row_span  # pylint: disable=g-import-not-at-top
  s1 = tiny_stage_runs["stage1"]
  got = row_span.measure(s1, num_ids=2, per_id=2)
  with np.load(os.path.join(s1, "prototypes.npz")) as z:
    want = prototypes.real_span(np.concatenate([z["real"], z["virtual"]]), len(z["real"]))
  assert got["real_span"] == want
  assert set(got["features_inside"]) == {"training people", "unseen people"}
  assert all(0.0 <= v <= 1.0 + 1e-6 for v in got["features_inside"].values())
  assert got["images_per_kind"] == {"training people": 4, "unseen people": 4}
  basis = prototypes.real_directions(np.asarray([[1.0, 0.0], [0.0, 1.0]]), 1)[1][:, :1]
  assert row_span._share(np.asarray([[3.0, 0.0], [0.0, 2.0]]), basis) == 0.5  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match="imagefolder"):
    row_span.measure(s1, str(tmp_path), num_ids=1, per_id=1)
