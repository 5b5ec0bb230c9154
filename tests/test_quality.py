"""The quality task (`configs/quality.py`): usefulness rows from real and generated FR runs."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import quality as quality_config
from vigface_jax import config_lib
from vigface_jax import tasks
from vigface_jax.data import faces
from vigface_jax.evaluate import quality

# A stand-in generation run: 5 exported identities × 3 images, procedural people far from the
# real baseline's (ids 500..504), with the metrics a generate run's summary carries.
NUM, PER = 5, 3


def _fake_generation(root, num=NUM, per=PER, width=3):
  folder = root / "imagefolder"
  for i in range(num):
    d = folder / f"{i:0{width}d}"
    d.mkdir(parents=True)
    for j in range(per):
      Image.fromarray(faces.render_face(0, 500 + i, j)[0]).save(d / f"{j:02d}.png")
  (root / "identities.json").write_text(json.dumps(
      {"identities": [{"label": i, "count": per} for i in range(num)]}))
  metrics = {"generated": {"consistency/top1": 0.9, "diversity/intra_pair_cos_mean": 0.7},
             "real": {"consistency/top1": 0.95, "diversity/intra_pair_cos_mean": 0.6},
             "realism": {"accuracy": 0.8, "fd": 0.2}}
  (root / "summary.json").write_text(json.dumps(
      {"judge": "aud", "metrics": {"aud": metrics}, "sampler": {"num_steps": 2},
       "guidance": 4.0, "drawn_this_run": {"dataset": 15, "fresh": 4},
       "draw_seconds": {"dataset": 3.0, "fresh": 1.0}}))
  (root / "config.json").write_text(json.dumps({"stage2": {"workdir": None}}))
  return root


def _config(gen, **overrides):
  config = quality_config.get_config("tiny")
  config.generated.workdir = str(gen)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  root = tmp_path_factory.mktemp("quality")
  gen = _fake_generation(root / "gen")
  work = root / "work"
  first = tasks.run(_config(gen, name="fake", note="planted"), str(work))
  real_mtime = os.path.getmtime(work / "real" / "summary.json")
  second = tasks.run(_config(gen, name="fake", control="shuffled_labels"), str(work))
  return work, first, second, real_mtime


def _summary(path):
  with open(path) as fh:
    return json.load(fh)


def test_a_row_holds_both_runs_figures_and_the_generation_metrics(rows):
  work, first, _, _ = rows
  gen_acc = _summary(work / "rows" / "fake" / "fr" / "summary.json")[quality.ACCURACY]
  real_acc = _summary(work / "real" / "summary.json")[quality.ACCURACY]
  assert first["accuracy_generated"] == gen_acc and first["accuracy_real"] == real_acc
  assert first["ratio"] == pytest.approx(gen_acc / real_acc)
  g = first["generated"]
  assert g["realism_accuracy"] == 0.8 and g["fd"] == 0.2
  assert g["consistency/top1"] == {"generated": 0.9, "real": 0.95}
  assert g["images_per_s"] == pytest.approx(5.0)
  # The generated run trained on exactly the chosen images: 4 ids × 2, the first of each.
  data = work / "rows" / "fake" / "data"
  folders = sorted(os.listdir(data))
  assert len(folders) == 4
  targets = {os.path.realpath(data / d / f) for d in folders for f in os.listdir(data / d)}
  assert targets == {os.path.realpath(work.parent / "gen" / "imagefolder" / f"{i:03d}" /
                                      f"{j:02d}.png") for i in range(4) for j in range(2)}
  sheet = np.asarray(Image.open(work / first["sheet"]))
  assert sheet.shape == (2 * 2 * 112 + 6, 2 * 112, 3)
  # Top block: the generated images; bottom block: real procedural faces.
  first_image = work.parent / "gen" / "imagefolder" / "000" / "00.png"
  np.testing.assert_array_equal(sheet[:112, :112], np.asarray(Image.open(first_image)))
  np.testing.assert_array_equal(sheet[2 * 112 + 6:3 * 112 + 6, :112],
                                faces.render_face(0, 0, 0)[0])


def test_rows_accumulate_and_the_real_baseline_is_reused(rows):
  work, _, second, real_mtime = rows
  assert os.path.getmtime(work / "real" / "summary.json") == real_mtime
  table = _summary(work / "quality.json")["rows"]
  assert [r["name"] for r in table] == ["fake", "fake (control: shuffled_labels)"]
  md = (work / "quality.md").read_text()
  assert "fake — planted" in md and "fake (control: shuffled_labels)" in md
  assert second["accuracy_real"] == table[0]["accuracy_real"]


def test_the_shuffled_control_keeps_the_images_and_breaks_the_identities(rows):
  work = rows[0]
  base = work / "rows" / "fake" / "data"
  shuffled = work / "rows" / "fake_control_shuffled_labels" / "data"

  def groups(root):
    return {frozenset(os.path.realpath(root / d / f) for f in os.listdir(root / d))
            for d in os.listdir(root)}

  g_base, g_shuffled = groups(base), groups(shuffled)
  assert set().union(*g_base) == set().union(*g_shuffled)  # the same 8 images
  assert g_base != g_shuffled  # dealt into other identities


def test_identities_are_taken_in_label_order_whatever_the_name_width(tmp_path):
  # The exporter pads names to the widest label (2 digits for 10..100 identities).
  gen = _fake_generation(tmp_path / "g", num=NUM, per=PER, width=2)
  (gen / "imagefolder" / "landmarks.txt").write_text("")  # the export's file beside the folders
  chosen = quality.choose_identities(str(gen), 4, 2)
  assert [os.path.basename(os.path.dirname(c[0])) for c in chosen] == ["00", "01", "02", "03"]
  assert [os.path.basename(p) for p in chosen[0]] == ["00.png", "01.png"]


def test_bad_inputs_name_what_is_missing(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no imagefolder export"):
    quality.run(_config(tmp_path / "nothing"), str(tmp_path / "w"))
  gen = _fake_generation(tmp_path / "small", num=3)
  with pytest.raises(config_lib.ConfigError, match="only 3 exported identities"):
    quality.run(_config(gen), str(tmp_path / "w"))
  config = _config(gen)
  config.fr.virtual.num_virtual = 4
  with pytest.raises(config_lib.ConfigError, match="without virtual rows"):
    quality.run(config, str(tmp_path / "w"))
  with pytest.raises(config_lib.ConfigError, match="control"):
    quality.run(_config(gen, control="typo"), str(tmp_path / "w"))
  for bad in ((0, 0), (-1,), (0.5,)):
    with pytest.raises(config_lib.ConfigError, match="fr_seeds"):
      quality.run(_config(gen, fr_seeds=bad), str(tmp_path / "w"))


def test_fr_seeds_repeat_both_runs_and_the_row_holds_the_mean_over_seeds(rows):
  """Two seeds: the recipe's own seed reuses the single-seed row's runs (same directories, not
  retrained), the other trains its own pair; the headline is the per-seed mean."""
  work, first, _, real_mtime = rows
  gen = work.parent / "gen"
  row = tasks.run(_config(gen, name="fake", note="planted", fr_seeds=(0, 3)), str(work))
  assert os.path.getmtime(work / "real" / "summary.json") == real_mtime
  assert row["seeds"] == [0, 3]
  zero, three = row["per_seed"]
  assert zero["accuracy_generated"] == first["accuracy_generated"]
  assert zero["accuracy_real"] == first["accuracy_real"]
  other = _summary(work / "real_seed3" / "summary.json")
  assert three["accuracy_real"] == other[quality.ACCURACY]
  assert three["accuracy_generated"] == _summary(
      work / "rows" / "fake" / "fr_seed3" / "summary.json")[quality.ACCURACY]
  saved = _summary(work / "real_seed3" / "config.json")
  assert saved["train"]["seed"] == 3
  ratios = [zero["accuracy_generated"] / zero["accuracy_real"],
            three["accuracy_generated"] / three["accuracy_real"]]
  assert row["ratio"] == pytest.approx(np.mean(ratios))
  assert row["ratio_seed_std"] == pytest.approx(np.std(ratios, ddof=1))
  mean_gen = np.mean([zero["accuracy_generated"], three["accuracy_generated"]])
  assert row["accuracy_generated"] == pytest.approx(mean_gen)
  mean_real = np.mean([zero["accuracy_real"], three["accuracy_real"]])
  assert row["ratio_above_chance"] == pytest.approx((mean_gen - 0.5) / (mean_real - 0.5))
  md = (work / "quality.md").read_text()
  line = next(l for l in md.splitlines() if l.startswith("| fake — planted"))
  assert f"{row['ratio']:.1%} ± {row['ratio_seed_std']:.1%}" in line and line.endswith("| 2 |")


def test_summarise_averages_ratios_per_seed_and_names_missing_figures():
  per = [{"accuracy_generated": 0.7, "accuracy_real": 0.8, "ratio": 0.875,
          "accuracy_std_generated": 0.02},
         {"accuracy_generated": 0.6, "accuracy_real": 0.9, "ratio": 0.6 / 0.9,
          "accuracy_std_generated": 0.03}]
  s = quality.summarise(per)
  assert s["ratio"] == pytest.approx((0.875 + 0.6 / 0.9) / 2)  # not 0.65 / 0.85
  assert s["accuracy_std_generated"] is None and s["accuracy_generated_seed_std"] > 0
  one = quality.summarise(per[:1])
  assert one["ratio_seed_std"] is None and one["accuracy_std_generated"] == 0.02
  assert one["ratio_above_chance"] == pytest.approx(0.2 / 0.3)
  missing = quality.summarise([dict(per[0], accuracy_generated=None, ratio=None)])
  assert missing["ratio"] is None and missing["ratio_above_chance"] is None


def test_a_stopped_row_resumes_its_fr_run_instead_of_starting_over(rows, tmp_path):
  """A stop request during the real recipe's training: the trainer stops after its step with
  a committed checkpoint; the rerun resumes that run (it is not deleted and restarted) and
  the row equals the uninterrupted one."""
  import signal  # pylint: disable=g-import-not-at-top
  from vigface_jax import preemption  # pylint: disable=g-import-not-at-top
  gen = _fake_generation(tmp_path / "gen")
  work = tmp_path / "work"
  with preemption.watch():
    preemption._received.append(signal.SIGTERM)  # pylint: disable=protected-access  # as the handler does
    with pytest.raises(preemption.Preempted, match="SIGTERM"):
      tasks.run(_config(gen, name="fake", note="planted"), str(work))
  stopped_at = sorted(int(d) for d in os.listdir(work / "real" / "checkpoints") if d.isdigit())
  assert stopped_at == [1] and not (work / "real" / "summary.json").exists()
  assert not (work / "rows" / "fake" / "fr").exists()  # the next unit never started
  (work / "real" / "marker").write_text("the stopped run's directory")
  row = tasks.run(_config(gen, name="fake", note="planted"), str(work))
  assert (work / "real" / "marker").exists()  # resumed in place, not deleted and restarted
  want = rows[1]
  assert row["accuracy_real"] == want["accuracy_real"]
  assert row["accuracy_generated"] == want["accuracy_generated"]
