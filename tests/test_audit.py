"""`generate/audit.py` on constructed embeddings: impostor thresholds hit their FMR, planted
leaks are flagged and traced to the right real identity, fresh identities are flagged only at
the held-out rate, the leak control can fail, and the writers' files parse back."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image
import pytest
from scipy import stats

from vigface_jax import ops
from vigface_jax.generate import audit

D = 32
OPTS = audit.AuditOptions(query_chunk=128)


def _unit(rng, n, d=D):
  return ops.l2_normalize_np(rng.normal(size=(n, d)).astype(np.float32))


def _images(rng, centres, per, labels, noise=0.6):
  """`per` images around each centre: centre + noise · N(0, I/d)."""
  emb = np.repeat(centres, per, axis=0)
  emb = emb + noise * rng.normal(size=emb.shape).astype(np.float32) / np.sqrt(centres.shape[1])
  return audit.Embedded(3.0 * emb, np.repeat(np.asarray(labels), per))  # any norm


class World:
  """Training people (labels 0..59), unrelated held-out people (1000..1119), sources of leaks."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)
    self.train_centres = _unit(self.rng, 60)
    self.training = _images(self.rng, self.train_centres, 8, np.arange(60))
    self.heldout = _images(self.rng, _unit(self.rng, 120), 4, 1000 + np.arange(120))

  def fresh(self, n, first_label, per=4):
    return _images(self.rng, _unit(self.rng, n), per, first_label + np.arange(n))

  def leaks(self, sources, first_label, per=4):
    """Identities generated from training rows: a training centre plus a little noise."""
    c = ops.l2_normalize_np(self.train_centres[sources]
                            + 0.2 * self.rng.normal(size=(len(sources), D)) / np.sqrt(D))
    e = _images(self.rng, c, per, first_label + np.arange(len(sources)))
    return audit.Embedded(e.emb, e.labels, np.repeat(np.asarray(sources), per))


@pytest.fixture(scope="module")
def world():
  return World(0)


@pytest.fixture(scope="module")
def clean_generated(world):
  return world.fresh(100, 5000)


@pytest.fixture(scope="module")
def clean_report(world, clean_generated):
  return audit.audit_encoder("enc", generated=clean_generated, training=world.training,
                             heldout=world.heldout, leak=world.leaks(np.arange(0, 40, 2), 9000),
                             options=OPTS)


# ------------------------------------------------------------------ thresholds


def test_impostor_threshold_hits_the_requested_fmr_of_a_known_distribution():
  # Cosines of independent uniform unit vectors in d dims: (1 + c) / 2 ~ Beta((d-1)/2, (d-1)/2).
  rng = np.random.default_rng(1)
  d, n = 128, 1500
  emb = rng.normal(size=(n, d)).astype(np.float32)
  cal = audit.impostor_calibration(emb, np.arange(n), fmrs=(1e-2, 1e-3))
  assert cal["pairs"] == cal["available"] == n * (n - 1) // 2 and not cal["sampled"]
  cos = cal["cosines"].astype(np.float64)
  a = (d - 1) / 2
  for f in (1e-2, 1e-3):
    t = cal["thresholds"][f]
    allowed = int(np.floor(f * cos.size))
    assert (cos > t).sum() <= allowed < (cos >= t).sum()  # the smallest such observed value
    assert f - 1.0 / cos.size <= cal["observed_fmr"][f] <= f
    true_fmr = stats.beta.sf((1 + t) / 2, a, a)
    assert 0.75 * f < true_fmr < 1.33 * f, (f, t, true_fmr)
  # The sampled paths (enumerate-and-subsample, and rejection sampling) agree closely.
  for max_pairs in (700_000, 200_000):
    sub = audit.impostor_calibration(emb, np.arange(n), fmrs=(1e-2,), max_pairs=max_pairs)
    assert sub["sampled"] and sub["pairs"] == max_pairs
    assert abs(sub["thresholds"][1e-2] - cal["thresholds"][1e-2]) < 0.01


def test_impostor_pairs_are_distinct_different_label_pairs_and_seeded():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 6, size=40)
  i, j, available = audit.impostor_pairs(labels)
  brute = {(a, b) for a in range(40) for b in range(a + 1, 40) if labels[a] != labels[b]}
  assert available == len(brute) and set(zip(i.tolist(), j.tolist())) == brute
  labels = np.arange(3000) // 2  # 4.5M different-label pairs: the rejection sampler
  i, j, available = audit.impostor_pairs(labels, max_pairs=50_000, seed=3)
  assert available == 3000 * 2999 // 2 - 1500 and i.size == 50_000
  assert (i < j).all() and (labels[i] != labels[j]).all()
  assert np.unique(i * 3000 + j).size == 50_000
  i2, j2, _ = audit.impostor_pairs(labels, max_pairs=50_000, seed=3)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(j, j2)
  assert not np.array_equal(i, audit.impostor_pairs(labels, max_pairs=50_000, seed=4)[0])


def test_an_fmr_without_enough_pairs_is_not_calibrated():
  emb = np.random.default_rng(3).normal(size=(20, 8))
  cal = audit.impostor_calibration(emb, np.arange(20), fmrs=(0.1, 1e-3))
  assert cal["thresholds"][0.1] is not None
  assert cal["thresholds"][1e-3] is None
  assert "10000" in cal["notes"][0] and "190" in cal["notes"][0]
  assert audit.impostor_thresholds(emb, np.arange(20), fmrs=(1e-3,)) == {1e-3: None}
  with pytest.raises(ValueError, match="fewer than two identities"):
    audit.impostor_thresholds(emb, np.zeros(20))


def test_centres_are_renormalised_means_of_unit_embeddings():
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(9, 5))
  labels = np.asarray([3, 1, 3, 2, 1, 3, 2, 2, 1])
  uniq, cen = audit.centres(emb * rng.uniform(0.5, 4, size=(9, 1)), labels)
  assert uniq.tolist() == [1, 2, 3]
  unit = ops.l2_normalize_np(emb)
  for k, lab in enumerate(uniq):
    m = unit[labels == lab].mean(0)
    np.testing.assert_allclose(cen[k], m / np.linalg.norm(m), atol=1e-6)


# ------------------------------------------------------------------ the audit


def test_image_and_real_to_real_statistics_match_brute_force(world, clean_generated,
                                                               clean_report):
  train_unit = ops.l2_normalize_np(world.training.emb)
  s = ops.l2_normalize_np(clean_generated.emb) @ train_unit.T
  img = clean_report["per_image"]["generated"]
  np.testing.assert_array_equal(img["train_row"], s.argmax(1))
  np.testing.assert_allclose(img["top1_cosine"], s.max(1), atol=1e-6)
  gen = clean_report["per_identity"]["generated"]
  assert gen["label"].tolist() == list(range(5000, 5100))  # 4 images each, in label order
  np.testing.assert_allclose(gen["image_mean_top1"], s.max(1).reshape(100, 4).mean(1),
                             atol=1e-6)
  nearest = world.training.labels[s.argmax(1)].reshape(100, 4)
  for k in range(100):  # the most frequent nearest identity, ties to the smallest label
    values, counts = np.unique(nearest[k], return_counts=True)
    assert gen["image_nearest_label"][k] == values[counts.argmax()]
  t_labels, t_cen = audit.centres(world.training.emb, world.training.labels)
  tr = clean_report["per_identity"]["training"]
  c = t_cen @ t_cen.T
  np.fill_diagonal(c, -np.inf)
  np.testing.assert_allclose(tr["nearest_other_cosine"], c.max(1), atol=1e-6)
  np.testing.assert_array_equal(tr["nearest_other_label"], t_labels[c.argmax(1)])


def test_class_and_image_statistics_equal_numpy_on_a_fresh_audit():
  w = World(7)
  gen = w.fresh(30, 500)
  r = audit.audit_encoder("e", generated=gen, training=w.training, heldout=w.heldout,
                          options=OPTS)
  g = r["per_identity"]["generated"]
  t_labels, t_cen = audit.centres(w.training.emb, w.training.labels)
  _, g_cen = audit.centres(gen.emb, gen.labels)
  s = g_cen @ t_cen.T
  np.testing.assert_allclose(g["class_cosine"], s.max(1), atol=1e-6)
  np.testing.assert_array_equal(g["nearest_label"], t_labels[s.argmax(1)])
  top1 = (ops.l2_normalize_np(gen.emb) @ ops.l2_normalize_np(w.training.emb).T).max(1)
  np.testing.assert_allclose(r["per_image"]["generated"]["top1_cosine"], top1, atol=1e-6)
  np.testing.assert_allclose(g["image_mean_top1"], top1.reshape(30, 4).mean(1), atol=1e-6)
  assert r["control"] is None and not r["conclusive"]
  assert r["verdict"] == "inconclusive"  # passing without a control proves nothing


def test_fresh_identities_pass_and_planted_leaks_are_all_detected(clean_report):
  r = clean_report
  assert r["passed"] and r["conclusive"] and r["verdict"] == "pass", r["tests"]
  assert r["control"]["class"] == 1.0 and r["control"]["either"] == 1.0
  assert r["control"]["nearest_is_true_label"] == 1.0
  leak = r["per_identity"]["leak"]
  np.testing.assert_array_equal(leak["nearest_label"], leak["true_label"])
  # Fresh identities are flagged at most at the binomial bound of the held-out rate.
  t = r["tests"]["class"]
  assert t["count"] <= t["upper_bound"] <= stats.binom.ppf(0.99, 100, max(
      r["rates"]["heldout_b"]["class"], 0.01))
  assert r["rates"]["generated"]["either"] <= 0.05
  held = r["per_identity"]["heldout"]
  assert set(held["half"].tolist()) == {"A", "B"}
  assert held["label"][held["half"] == "A"].tolist() == list(range(1000, 1120, 2))
  # Thresholds lie between unrelated people and leaks.
  th = r["thresholds"]
  assert r["distributions"]["class"]["leak"]["min"] > th["class"]
  assert r["distributions"]["class"]["generated"]["p50"] < th["class"]
  assert set(th["impostor"]) == {1e-3, 1e-4} and None not in th["impostor"].values()
  assert th["impostor"][1e-4] > th["impostor"][1e-3]
  assert r["image_fractions"][1e-3]["leak"] > 0.9
  assert r["outside"]["heldout_b_above"] <= 0.05


def test_a_leaking_identity_is_flagged_and_traced_to_its_real_source(world):
  gen_fresh = world.fresh(95, 6000)
  leaks = world.leaks(np.asarray([3, 17, 29, 41, 58]), 6100)
  gen = audit.Embedded(np.concatenate([gen_fresh.emb, leaks.emb]),
                       np.concatenate([gen_fresh.labels, leaks.labels]))
  r = audit.audit_encoder("enc", generated=gen, training=world.training,
                          heldout=world.heldout, options=OPTS)
  g = r["per_identity"]["generated"]
  leak_rows = np.isin(g["label"], leaks.labels)
  assert g["class_flag"][leak_rows].all() and g["image_flag"][leak_rows].all()
  assert g["nearest_label"][leak_rows].tolist() == [3, 17, 29, 41, 58]
  assert g["image_nearest_label"][leak_rows].tolist() == [3, 17, 29, 41, 58]
  assert g["flagged"][~leak_rows].sum() <= 3
  assert set(r["flagged_labels"]) >= set(leaks.labels.tolist())


def test_the_control_fails_when_the_leaks_are_unrelated_people(world):
  # "Leaks" that are really fresh people with made-up sources: the control must not be met.
  fake = world.fresh(20, 9500)
  fake = audit.Embedded(fake.emb, fake.labels, np.repeat(np.arange(20), 4))
  r = audit.audit_encoder("enc", generated=world.fresh(50, 7000), training=world.training,
                          heldout=world.heldout, leak=fake, options=OPTS)
  assert r["control"]["class"] <= 0.1 and r["control"]["nearest_is_true_label"] <= 0.1
  assert not r["conclusive"]
  assert r["verdict"] != "pass"


def test_the_verdict_fails_when_the_generated_set_is_made_of_leaks(world):
  leaks = world.leaks(np.arange(40), 8000)
  r = audit.audit_encoder("enc", generated=audit.Embedded(leaks.emb, leaks.labels),
                          training=world.training, heldout=world.heldout, leak=leaks,
                          options=OPTS)
  assert r["conclusive"] and not r["passed"] and r["verdict"] == "fail"
  assert not r["tests"]["class"]["passed"] and not r["tests"]["image"]["passed"]
  assert not r["tests"]["image_fraction"]["passed"]
  assert r["rates"]["generated"]["class"] == 1.0


def test_bad_inputs_name_the_set(world):
  with pytest.raises(ValueError, match="leak needs true_labels"):
    audit.audit_encoder("e", generated=world.fresh(5, 1), training=world.training,
                        heldout=world.heldout, leak=world.fresh(2, 9), options=OPTS)
  with pytest.raises(ValueError, match="generated has shape"):
    audit.audit_encoder("e", generated=(np.ones((3, 7)), np.arange(3)),
                        training=world.training, heldout=world.heldout, options=OPTS)
  bad = world.leaks(np.arange(2), 9)
  with pytest.raises(ValueError, match="leak true label 77"):
    audit.audit_encoder("e", generated=world.fresh(5, 1), training=world.training,
                        heldout=world.heldout, options=OPTS,
                        leak=audit.Embedded(bad.emb, bad.labels, bad.true_labels + 77))
  with pytest.raises(ValueError, match="verdict_fmr"):
    audit.AuditOptions(verdict_fmr=1e-2)


# ------------------------------------------------------------------ combine and writers


def test_combine_needs_every_encoder_to_pass_and_be_conclusive(world, clean_report):
  failing = dict(clean_report, passed=False, verdict="fail", flagged_labels=[5001])
  inconclusive = dict(clean_report, conclusive=False, verdict="inconclusive")
  assert audit.combine({"a": clean_report, "b": clean_report})["verdict"] == "pass"
  both = audit.combine({"a": clean_report, "b": failing})
  assert both["verdict"] == "fail" and not both["passed"]
  assert set(both["flagged_labels"]) == set(clean_report["flagged_labels"]) | {5001}
  assert both["rates"]["class_flag_rate"] == {"a": clean_report["rates"]["generated"]["class"],
                                              "b": clean_report["rates"]["generated"]["class"]}
  assert audit.combine({"a": clean_report, "b": inconclusive})["verdict"] == "inconclusive"
  with pytest.raises(ValueError, match="no encoder reports"):
    audit.combine({})
  other = audit.audit_encoder("x", generated=world.fresh(3, 1), training=world.training,
                              heldout=world.heldout, options=OPTS)
  with pytest.raises(ValueError, match="different generated identities"):
    audit.combine({"a": clean_report, "x": other})


def test_writers_produce_files_that_parse_back(tmp_path, clean_report):
  flagged = dict(clean_report, flagged_labels=[5003])
  flagged["per_identity"] = dict(clean_report["per_identity"])
  gen = dict(clean_report["per_identity"]["generated"])
  gen["flagged"] = gen["label"] == 5003
  flagged["per_identity"]["generated"] = gen
  reports = {"stage1": clean_report, "indep": flagged}
  combined = audit.combine(reports)

  audit.write_json(tmp_path / "audit.json", combined)
  text = (tmp_path / "audit.json").read_text()
  def no_constant(name):
    raise AssertionError(f"non-JSON constant {name}")
  data = json.loads(text, parse_constant=no_constant)
  assert "per_identity" not in text and "per_image" not in text
  assert data["verdict"] == "pass" and data["flagged_labels"] == [5003]
  rep = data["reports"]["stage1"]
  assert rep["thresholds"]["impostor"]["0.001"] == pytest.approx(
      clean_report["thresholds"]["impostor"][1e-3])
  assert len(rep["histograms"]["class"]["generated"]) == 100
  assert rep["distributions"]["class"]["generated"]["n"] == 100

  rows = {int(lab): 10 + k for k, lab in enumerate(gen["label"])}
  audit.write_identities_csv(tmp_path / "ids.csv", reports, rows=rows)
  with open(tmp_path / "ids.csv", newline="") as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == 100
  assert list(lines[0]) == ["label", "row", "stage1_nearest_real_label", "stage1_class_cosine",
                            "stage1_image_mean_top1", "stage1_flagged",
                            "indep_nearest_real_label", "indep_class_cosine",
                            "indep_image_mean_top1", "indep_flagged", "flagged"]
  assert [int(x["row"]) for x in lines] == list(range(10, 110))
  assert [x["label"] for x in lines if x["flagged"] == "1"] == ["5003"]
  k = 7
  assert float(lines[k]["stage1_class_cosine"]) == pytest.approx(
      float(gen["class_cosine"][k]), abs=1e-6)
  assert int(lines[k]["indep_nearest_real_label"]) == int(gen["nearest_label"][k])

  audit.write_histograms(tmp_path / "audit_hist.png", reports)
  with Image.open(tmp_path / "audit_hist.png") as im:
    assert im.size[0] > 500 and im.size[1] > 500

  pairs = audit.closest_pairs(clean_report, n=6)
  top1 = clean_report["per_image"]["generated"]["top1_cosine"]
  assert [p[2] for p in pairs] == sorted(top1.tolist(), reverse=True)[:6]
  def image(row):
    return np.full((112, 112, 3), row % 256, np.uint8)
  audit.write_closest(tmp_path / "audit_closest.png", pairs, image, image, n=6)
  with Image.open(tmp_path / "audit_closest.png") as im:
    assert im.size[0] > 500
  with pytest.raises(ValueError, match="get_training_image"):
    audit.write_closest(tmp_path / "bad.png", pairs, image, lambda r: np.zeros((112, 112)))
