"""Stage 3 (`generate/task.py`, `generate/audit_task.py`) on tiny stage-1 and stage-2 runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import textwrap
import types

import jax
import numpy as np
import pytest

import config_fields
from conftest import run_on_fake_devices
from configs import audit as audit_config
from configs import generate as generate_config
from vigface_jax import config_lib
from vigface_jax.data import recordio
from vigface_jax.data import recordio_writer
from vigface_jax.diffusion import samplers
from vigface_jax.diffusion import schedules
from vigface_jax.evaluate import prototypes
from vigface_jax.generate import audit_task
from vigface_jax.generate import sampling
from vigface_jax.generate import store as store_lib
from vigface_jax.generate import task
from vigface_jax import tasks


@pytest.fixture(scope="module")
def runs(tiny_stage_runs):
  """A tiny stage 1, a stage 2 trained on it, and an independent tiny auditor (conftest's,
  shared with the preemption and fault-injection tests; nothing here writes into them)."""
  return tiny_stage_runs


def _config(runs, **changes):
  config = generate_config.get_config("tiny")
  config.stage1.workdir = runs["stage1"]
  config.stage2.workdir = runs["stage2"]
  config.audit.encoders = (runs["auditor"],)
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _shard_digests(workdir):
  store = store_lib.ShardStore(workdir)
  return [store_lib.sha256_file(store.shard_path(s)) for s in range(store.num_shards)]


@pytest.fixture(scope="module")
def generated(runs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("generated"))
  config = _config(runs)
  with config_fields.recording(config) as record:  # the task reads only declared fields
    summary = task.run(config, workdir)
  assert not record.missing, sorted(record.missing)
  return workdir, summary


def test_presets_resolve_to_the_stated_sizes():
  for variant, (ids, per) in {"S": (10_000, 50), "B": (60_000, 20), "L": (120_000, 50),
                              "demo": (212, 20)}.items():
    c = generate_config.get_config(variant)
    assert (c.num_ids, c.images_per_id, c.rows) == (ids, per, "virtual"), variant
  aug = generate_config.get_config("augment")
  assert (aug.rows, aug.num_ids, aug.augment_to) == ("real", None, 50)
  assert generate_config.get_config("B").num_ids == generate_config.get_config().num_ids
  with pytest.raises(ValueError, match="unknown variant"):
    generate_config.get_config("XL")


def test_generate_writes_every_format_audit_and_manifest(generated):
  workdir, summary = generated
  for name in ("imagefolder", "recordio/train.rec", "recordio/train.idx", "recordio/property",
               "arrayrecord/dataset_info.json", "identities.json", "manifest.json",
               "audit.json", "audit_hist.png", "audit_closest.png", "audit_identities.csv",
               "contact_sheet.png", "pose_model.npz", "summary.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert summary["num_ids"] == 4 and summary["images"] == 8
  assert set(summary["verify_export"]) == {"imagefolder", "recordio", "arrayrecord"}
  assert summary["exported_ids"] + summary["dropped_ids"] == 4
  # RecordIO: labels intact, landmarks of every image as drawn.
  src = recordio.RecordIOSource(os.path.join(workdir, "recordio", "train.rec"))
  store = store_lib.StoreSource(workdir, exclude_labels=json.load(open(
      os.path.join(workdir, "identities.json")))["dropped"])
  assert [int(src[i]["label"]) for i in range(len(src))] == store.labels.tolist()
  np.testing.assert_allclose(np.stack([src[i]["landmarks"] for i in range(len(src))]),
                             store.landmarks, atol=1e-4)
  # Flagged identities are the ones left out of the export (audit.drop_flagged); every line
  # of the CSV names the stage-1 row its identity was drawn from.
  with open(os.path.join(workdir, "audit_identities.csv")) as f:
    table = list(csv.DictReader(f))
  flagged = sorted(int(r["label"]) for r in table if r["flagged"] == "1")
  dropped = json.load(open(os.path.join(workdir, "identities.json")))["dropped"]
  assert sorted(d["original_label"] for d in dropped) == flagged
  everything = store_lib.StoreSource(workdir)
  first = np.searchsorted(everything.original_labels, np.arange(4))
  assert [int(r["row"]) for r in table] == everything.rows[first].tolist()
  audit = json.load(open(os.path.join(workdir, "audit.json")))
  assert set(audit["encoders"]) == {"stage1", "auditor"}
  assert {"control_class", "class_flag_rate"} <= set(audit["rates"])
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  assert manifest["complete"] and set(manifest["exports"]["formats"]) == set(task.FORMATS)


def test_rerun_after_interruption_gives_identical_checksums(runs, generated, tmp_path):
  workdir, _ = generated
  want = _shard_digests(workdir)
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  copy = str(tmp_path / "resumed")
  shutil.copytree(workdir, copy)
  store = store_lib.ShardStore(copy)
  os.remove(store.shard_path(1))  # a shard lost (killed before its rename)
  os.remove(store.record_path(1))
  with open(store.shard_path(0), "r+b") as f:  # and one corrupted on disk
    f.seek(100)
    f.write(b"\x00corrupt")
  for name in ("imagefolder", "recordio", "arrayrecord", "manifest.json"):
    path = os.path.join(copy, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  again_summary = task.run(_config(runs), copy)
  assert again_summary["drawn_this_run"]["dataset"] == 8  # both shards redone: 2 ids × 2 each
  assert _shard_digests(copy) == want
  again = json.load(open(os.path.join(copy, "manifest.json")))
  assert again["shards"] == manifest["shards"]
  assert again["exports"]["formats"] == manifest["exports"]["formats"]


def test_other_settings_in_the_same_workdir_are_refused(runs, generated, tmp_path):
  workdir, _ = generated
  copy = str(tmp_path / "other")
  shutil.copytree(os.path.join(workdir, "shards"), os.path.join(copy, "shards"))
  with pytest.raises(ValueError, match="guidance"):
    task.run(_config(runs, **{"sample.guidance": 2.5}), copy)


_DEVICES_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from test_generate import _config
from vigface_jax.generate import store as store_lib, task
import jax
assert len(jax.local_devices()) == 8
runs = json.loads(RUNS)
config = _config(runs, run_audit=False, formats=("imagefolder",), batch_size=4)
config.checks.fresh_ids = 0
config.checks.pool_ids = 0
task.run(config, WORKDIR)
print("OK")
"""


def test_dataset_does_not_depend_on_device_count_or_batch_size(runs, tmp_path):
  one = str(tmp_path / "one")
  config = _config(runs, run_audit=False, formats=("imagefolder",), batch_size=3)
  config.checks.fresh_ids = 0
  config.checks.pool_ids = 0
  task.run(config, one)
  eight = str(tmp_path / "eight")
  script = _DEVICES_SCRIPT.replace("RUNS", repr(json.dumps(runs))).replace(
      "WORKDIR", repr(eight))
  run_on_fake_devices(script, timeout=300)
  a, b = store_lib.StoreSource(one), store_lib.StoreSource(eight)
  for field in ("labels", "indices", "rows", "seeds", "landmarks"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  images_a = np.stack([a[i]["image"] for i in range(len(a))]).astype(int)
  images_b = np.stack([b[i]["image"] for i in range(len(b))]).astype(int)
  # Same ids, poses and noise; the pixels agree up to float rounding of other batch layouts.
  assert np.abs(images_a - images_b).mean() < 1.0


def test_per_example_keys_make_images_independent_of_their_batch():
  schedule = schedules.make_schedule("cosine", 1000)
  fn = lambda x, t: 0.5 * x
  keys = sampling.image_keys(3, np.arange(6), np.arange(6) % 2)
  whole = samplers.ddim_sample(fn, schedule, (6, 4, 4, 3), keys, num_steps=4, eta=1.0,
                               kind="eps")
  part = samplers.ddim_sample(fn, schedule, (2, 4, 4, 3), keys[2:4], num_steps=4, eta=1.0,
                              kind="eps")
  np.testing.assert_array_equal(np.asarray(whole)[2:4], np.asarray(part))
  # The control: with one key per batch, images 2..3 redrawn as a batch of their own differ.
  shared = samplers.ddim_sample(fn, schedule, (6, 4, 4, 3), jax.random.PRNGKey(0), num_steps=4,
                                eta=1.0, kind="eps")
  shared2 = samplers.ddim_sample(fn, schedule, (2, 4, 4, 3), jax.random.PRNGKey(0),
                                 num_steps=4, eta=1.0, kind="eps")
  assert not np.allclose(np.asarray(shared)[2:4], np.asarray(shared2))
  assert (sampling.image_keys(3, [1], [1]) == keys[1:2]).all()
  assert not (sampling.image_keys(4, [1], [1]) == keys[1:2]).all()
  with pytest.raises(ValueError, match="image_keys"):
    sampling.image_keys(0, [-1], [0])


def test_skipping_the_unguided_batch_outside_the_interval_changes_only_rounding():
  schedule = schedules.make_schedule("cosine", 1000)
  calls = []

  def model(x, t, c):
    calls.append(x.shape[0])
    return 0.3 * x + 0.1 * c[:, None, None, None]

  out = {}
  for skip in (False, True):
    fn = samplers.cfg_model_fn(model, np.ones(3, np.float32), 4.0, interval=(150, 880),
                               rescale=0.7, skip_outside=skip)
    out[skip] = np.asarray(samplers.ddim_sample(fn, schedule, (3, 4, 4, 3),
                                                jax.random.PRNGKey(0), num_steps=50, eta=1.0,
                                                kind="x0", spacing="trailing"))
  np.testing.assert_allclose(out[True], out[False], atol=1e-5)
  assert 3 in calls  # the conditional-only branch exists in the skipping sampler


def test_missing_workdirs_and_too_many_ids_name_the_fields(runs, tmp_path):
  config = _config(runs)
  config.stage2.workdir = None
  with pytest.raises(config_lib.ConfigError, match="stage2.workdir"):
    tasks.run(config, str(tmp_path / "a"))
  with pytest.raises(config_lib.ConfigError, match="stage1.workdir"):
    task.run(_config(runs, **{"stage1.workdir": str(tmp_path / "nowhere")}), str(tmp_path / "b"))
  with pytest.raises(config_lib.ConfigError, match=r"num_ids=17.*k=16.*virtual.num_virtual"):
    task.run(_config(runs, num_ids=17), str(tmp_path / "c"))
  with pytest.raises(config_lib.ConfigError, match="formats"):
    task.run(_config(runs, formats=("imagefolder", "zip")), str(tmp_path / "d"))
  with pytest.raises(config_lib.ConfigError, match="pose.source"):
    task.run(_config(runs, **{"pose.source": "random"}), str(tmp_path / "e"))


def test_a_stage2_trained_on_other_rows_is_refused_naming_both(runs, tmp_path):
  other = str(tmp_path / "other_stage1")
  shutil.copytree(runs["stage1"], other)
  path = os.path.join(other, "prototypes.npz")
  with np.load(path) as f:
    arrays = dict(f)
  arrays["real"] = np.roll(arrays["real"], 1, axis=0)
  np.savez(path, **arrays)
  with pytest.raises(config_lib.ConfigError, match=r"stage2.workdir=.*other stage-1 rows.*"
                     r"stage1.workdir=.*other_stage1"):
    task.run(_config(runs, **{"stage1.workdir": other}), str(tmp_path / "gen"))


def test_audit_task_on_an_export_and_on_a_dataset_without_labels(runs, generated, tmp_path):
  workdir, _ = generated
  config = audit_config.get_config("tiny")
  config.dataset.path = os.path.join(workdir, "recordio", "train.rec")
  config.stage1.workdir = runs["stage1"]
  config.audit.encoders = (runs["auditor"],)
  with config_fields.recording(config) as record:
    summary = audit_task.run(config, str(tmp_path / "audit"))
  assert not record.missing, sorted(record.missing)
  assert summary["audit"]["verdict"] in ("pass", "fail", "inconclusive")
  for name in ("audit.json", "audit_hist.png", "audit_closest.png", "audit_identities.csv"):
    assert os.path.exists(tmp_path / "audit" / name), name
  # A pack whose images all carry label 0 (DCFace's release) has no identities to audit.
  rec = str(tmp_path / "unlabelled" / "train.rec")
  os.makedirs(os.path.dirname(rec))
  image = np.zeros((112, 112, 3), np.uint8)
  with recordio_writer.RecordIOWriter(rec, num_classes=1) as w:
    for _ in range(4):
      w.write(image, 0)
  config.dataset.path = rec
  with pytest.raises(config_lib.ConfigError, match="identity labels"):
    audit_task.run(config, str(tmp_path / "audit2"))
  config.audit.encoders = ()
  config.stage1.workdir = None
  with pytest.raises(config_lib.ConfigError, match="no encoder"):
    audit_task.run(config, str(tmp_path / "audit3"))


def test_the_audit_stops_between_its_embedding_passes(runs, generated, tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  from vigface_jax import preemption  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import report  # pylint: disable=g-import-not-at-top
  config = audit_config.get_config("tiny")
  config.dataset.path = os.path.join(generated[0], "recordio", "train.rec")
  config.stage1.workdir = runs["stage1"]
  config.audit.encoders = (runs["auditor"],)
  real, passes = report.reference, []

  def reference(*args, **kwargs):
    passes.append(args[-1])
    out = real(*args, **kwargs)
    if len(passes) == 2:  # the signal arrives while the held-out people are embedded
      preemption._received.append(signal.SIGTERM)  # pylint: disable=protected-access
    return out

  monkeypatch.setattr(report, "reference", reference)
  with preemption.watch():
    with pytest.raises(preemption.Preempted,
                       match="stopped on SIGTERM after embedding the held-out people"):
      audit_task.run(config, str(tmp_path / "audit"))
  assert passes == ["training images", "held-out people"]  # nothing after the stop
  assert not os.path.exists(tmp_path / "audit" / "summary.json")


def test_augment_tops_real_classes_up_with_their_own_rows(runs, tmp_path):
  # Real rows; the tiny stage 1 has 16 classes × 8 images: top each up to 10 (2 new each)
  # for the first 3, and check a store with per-identity counts through a hand-made one.
  config = _config(runs, rows="real", num_ids=3, images_per_id=None, augment_to=10,
                   run_audit=False, formats=("recordio",))
  config.checks.fresh_ids = 0
  config.checks.pool_ids = 0
  summary = task.run(config, str(tmp_path / "aug"))
  src = store_lib.StoreSource(str(tmp_path / "aug"))
  assert summary["images"] == 6 and src.rows.tolist() == [0, 0, 1, 1, 2, 2]
  uneven = store_lib.ShardStore(str(tmp_path / "uneven"), spec={
      "num_ids": 2, "images_per_id": 3, "ids_per_shard": 2, "counts": [3, 1]})
  assert uneven.shard_count(0) == 4
  images = np.zeros((4, 112, 112, 3), np.uint8)
  uneven.write_shard(0, images, labels=[0, 0, 0, 1], indices=[0, 1, 2, 0], rows=[0] * 4,
                     seeds=[0] * 4, landmarks=np.zeros((4, 5, 2)))
  with pytest.raises(ValueError, match="indices"):
    uneven.write_shard(0, images, labels=[0, 0, 1, 1], indices=[0, 1, 0, 1], rows=[0] * 4,
                       seeds=[0] * 4, landmarks=np.zeros((4, 5, 2)))


_TWO_PROCESSES = textwrap.dedent("""
    import sys
    from absl import flags, logging
    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    import jax
    address, process_id, workdir, s1, s2 = sys.argv[1:6]
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=int(process_id), coordinator_bind_address=address,
                               initialization_timeout=60)
    from configs import generate
    from vigface_jax import main
    config = generate.get_config("tiny")
    config.stage1.workdir, config.stage2.workdir = s1, s2
    config.run_audit = False
    config.formats = ("recordio",)
    config.checks.fresh_ids = config.checks.pool_ids = 0
    main.run(config, workdir)
    print("OK")
""")


def test_two_processes_each_draw_their_own_shards_of_the_same_dataset(runs, tmp_path):
  """Two JAX processes (one CPU device each): process p draws shards s % 2 == p, process 0
  exports; the shards are byte-identical to a one-process run's."""
  import test_multihost  # pylint: disable=g-import-not-at-top
  one = str(tmp_path / "one")
  config = _config(runs, run_audit=False, formats=("recordio",))
  config.checks.fresh_ids = config.checks.pool_ids = 0
  task.run(config, one)
  two, logs = tmp_path / "two", tmp_path / "logs"
  logs.mkdir()
  outputs = test_multihost._run_processes(two, logs, child=_TWO_PROCESSES,
                                          args=(runs["stage1"], runs["stage2"]))
  assert _shard_digests(str(two)) == _shard_digests(one)
  # Each process drew its own shard: the tiny dataset has two (2 identities each).
  for out in outputs:
    assert "1 to draw here" in out, out[-2000:]
  recs = [recordio.RecordIOSource(os.path.join(d, "recordio", "train.rec")) for d in (one, two)]
  assert [int(r["label"]) for r in recs[0]] == [int(r["label"]) for r in recs[1]]


def test_row_offset_draws_rows_the_headline_never_sees():
  """A tuning run (row_offset = the headline's num_ids) gets disjoint rows of the same order."""
  s1 = types.SimpleNamespace(real=np.zeros((5, 3), np.float32), workdir="s1",
                             virtual=np.arange(30 * 3, dtype=np.float32).reshape(30, 3))
  for order in ("first", "random"):
    config = generate_config.get_config("tiny")
    config.row_order = order
    config.num_ids = 10
    head = task.plan_dataset(config, s1, None, "w")
    config.row_offset = 10
    tune = task.plan_dataset(config, s1, None, "w")
    assert len(tune.row_ids) == 10 and not set(head.row_ids) & set(tune.row_ids), order
    np.testing.assert_array_equal(tune.rows, s1.virtual[tune.row_ids - 5])
    config.row_offset, config.num_ids = 20, 10
    task.plan_dataset(config, s1, None, "w")  # exactly k rows used: fine
    config.row_offset = 21
    with pytest.raises(config_lib.ConfigError, match=r"num_ids=10 \+ row_offset=21.*k=30"):
      task.plan_dataset(config, s1, None, "w")
  config = generate_config.get_config("tiny")
  config.num_ids, config.row_offset = 10, 0
  first = task.plan_dataset(config, s1, None, "w").row_ids
  # Offset 0 is the order every earlier run drew (the seeded permutation's first num_ids).
  expected = np.sort(np.random.default_rng([0, 7]).permutation(30)[:10]) + 5
  np.testing.assert_array_equal(first, expected)


def test_row_span_draws_each_virtual_row_inside_the_real_span():
  """`row_span` replaces the virtual rows every consumer sees by their projection onto the
  real rows' span and records how far the drawn rows are from the real ones; unset, the
  rows are stage 1's own."""
  from vigface_jax.generate import loading  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  real = np.zeros((40, 12), np.float32)
  real[:, :4] = rng.normal(size=(40, 4))
  virtual = rng.normal(size=(30, 12)).astype(np.float32)
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s1 = loading.Stage1(workdir="s1", config=None, info={}, real=norm(real),
                      virtual=norm(virtual))
  config = generate_config.get_config("tiny")
  config.num_ids = 10
  same, span, basis = task.project_rows(config, s1)
  assert same is s1 and span is None and basis is None
  config.row_span = 0.999
  task.validate(config)
  drawn, span, basis = task.project_rows(config, s1)
  assert basis.shape == (12, 4)
  np.testing.assert_allclose(basis[4:], 0.0, atol=1e-6)
  assert span["dims"] == 4 and span["of"] == 12 and span["energy"] == 0.999
  np.testing.assert_allclose(drawn.virtual[:, 4:], 0.0, atol=1e-6)
  np.testing.assert_allclose(drawn.virtual[:, :4], norm(virtual[:, :4]), atol=1e-5)
  group = task.plan_dataset(config, drawn, None, "w")
  np.testing.assert_array_equal(group.rows, drawn.virtual[group.row_ids - 40])
  nearest = (norm(virtual[:, :4]) @ norm(real[:, :4]).T).max(axis=1)
  assert span["nearest_real_to_virtual"]["max"] == pytest.approx(nearest.max(), abs=1e-5)
  assert "passed" in span["verdict"]
  config.row_relax_steps = 100  # then moved away from the real rows, still inside the span
  relaxed, far, _ = task.project_rows(config, s1)
  np.testing.assert_allclose(relaxed.virtual[:, 4:], 0.0, atol=1e-6)
  assert far["relax_steps"] == 100
  assert far["nearest_real_to_virtual"]["p99"] < span["nearest_real_to_virtual"]["p99"] - 0.05
  config.row_shape = "real"  # then given the real rows' energy profile, still in the span
  task.validate(config)
  shaped, info, _ = task.project_rows(config, s1)
  assert info["shape"] == "real"
  np.testing.assert_allclose(shaped.virtual[:, 4:], 0.0, atol=1e-6)
  np.testing.assert_allclose(shaped.virtual, prototypes.shape_like_real(
      relaxed.virtual, s1.real, basis), atol=1e-6)
  config.row_span = None  # shaping needs a span
  with pytest.raises(config_lib.ConfigError, match="row_shape='real' needs row_span"):
    task.project_rows(config, s1)
  config.row_shape = "round"
  with pytest.raises(config_lib.ConfigError, match="row_shape"):
    task.validate(config)
  config.row_span, config.row_shape = 0.999, "span"
  config.row_relax_steps = 0
  config.rows = "real"  # real rows are drawn as they are
  assert task.project_rows(config, s1) == (s1, None, None)
  for bad in (0.0, 1.5, float("inf")):
    config.row_span = bad
    with pytest.raises(config_lib.ConfigError, match="row_span"):
      task.validate(config)


def test_row_jitter_gives_each_image_its_own_row_near_its_identitys():
  """Jittered rows: deterministic per (seed, label, index) whatever the batch, at the cosine
  the scale asks for, inside the span when a basis is given; 0 = the identity's row."""
  rng = np.random.default_rng(1)
  d, dims = 64, 8
  basis = np.linalg.qr(rng.normal(size=(d, dims)))[0]
  rows = rng.normal(size=(3, dims)) @ basis.T
  rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
  labels = np.repeat(np.arange(3), 200)
  indices = np.tile(np.arange(200), 3)
  np.testing.assert_array_equal(task.jitter_rows(rows[labels], 0, labels, indices, 0.0),
                                rows[labels])
  for scale, b in ((0.5, basis), (1.0, None)):
    out = task.jitter_rows(rows[labels], 0, labels, indices, scale, b)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cos = np.sum(out * rows[labels], axis=1)
    assert abs(cos.mean() - 1 / np.sqrt(1 + scale**2)) < 0.05
    assert cos.std() > 0.01  # each image its own row
    if b is not None:  # nothing outside the span
      np.testing.assert_allclose(out - (out @ b) @ b.T, 0.0, atol=1e-5)
    part = task.jitter_rows(rows[labels[5:9]], 0, labels[5:9], indices[5:9], scale, b)
    np.testing.assert_array_equal(part, out[5:9])  # batching does not change an image's row
    other = task.jitter_rows(rows[labels[5:9]], 1, labels[5:9], indices[5:9], scale, b)
    assert np.abs(other - part).max() > 1e-3  # another seed, other rows
  config = generate_config.get_config("tiny")
  for key, bad in (("sample.row_jitter", -0.1), ("pose.spread", 0.0)):
    c = generate_config.get_config("tiny")
    sub, field = key.split(".")
    c[sub][field] = bad
    with pytest.raises(config_lib.ConfigError, match=field):
      task.validate(c)
  task.validate(config)


def test_residuals_keep_a_real_images_distance_from_the_row():
  """split_features recovers e = a·c + √(1−a²)·u; residual_rows gives each image's condition
  the bank entry's cosine to its row, a unit vector, deterministic per (seed, label, index)
  whatever the batch; no bank = the rows."""
  rng = np.random.default_rng(2)
  d, r = 32, 50
  centres = rng.normal(size=(r, d))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  feats = 3.0 * (centres + 0.6 * rng.normal(size=(r, d)) / np.sqrt(d))  # unnormalised
  bank = task.split_features(feats, centres, np.arange(r))
  e = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  np.testing.assert_allclose(np.sum(e * centres, axis=1), bank.cosines, atol=1e-6)
  np.testing.assert_allclose(np.sum(bank.residuals * centres, axis=1), 0.0, atol=1e-6)
  rebuilt = (bank.cosines[:, None] * centres
             + np.sqrt(1 - bank.cosines[:, None] ** 2) * bank.residuals)
  np.testing.assert_allclose(rebuilt, e, atol=1e-5)
  rows = rng.normal(size=(4, d)).astype(np.float32)
  labels, indices = np.repeat(np.arange(4), 30), np.tile(np.arange(30), 4)
  np.testing.assert_array_equal(task.residual_rows(rows[labels], None, 0, labels, indices),
                                rows[labels])
  out = task.residual_rows(rows[labels], bank, 0, labels, indices)
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
  cos = np.sum(out * unit[labels], axis=1)
  # Every image's cosine to its row is one of the bank's real cosines, and they vary.
  assert np.abs(cos[:, None] - bank.cosines[None]).min(axis=1).max() < 1e-5
  # Images draw their own entries (30 draws per identity from 50: about 23 distinct each).
  assert cos.std() > 1e-3 and len(np.unique(np.round(out, 5), axis=0)) > len(out) // 2
  part = task.residual_rows(rows[labels[7:11]], bank, 0, labels[7:11], indices[7:11])
  np.testing.assert_array_equal(part, out[7:11])
  other = task.residual_rows(rows[labels[7:11]], bank, 5, labels[7:11], indices[7:11])
  assert np.abs(other - part).max() > 1e-3


def test_an_image_conditioned_stage2_draws_each_image_from_a_transplanted_residual(
    runs, generated, tmp_path):
  """A stage-2 run saying diffusion.condition='image' gets a residual bank (in its summary and
  store spec) and images other than the row-conditioned draw's; residual_bank=0 = the rows."""
  s2 = tmp_path / "dit_image"
  shutil.copytree(runs["stage2"], s2)
  with open(s2 / "config.json") as f:
    cfg = json.load(f)
  cfg["diffusion"]["condition"] = "image"
  with open(s2 / "config.json", "w") as f:
    json.dump(cfg, f)
  base_dir, base = generated
  config = _config(runs, **{"stage2.workdir": str(s2), "sample.residual_bank": 6,
                            "run_audit": False, "formats": ("imagefolder",)})
  for group in ("fresh_ids", "pool_ids", "sheet_ids"):
    config.checks[group] = 0
  summary = task.run(config, str(tmp_path / "gen"))
  assert summary["condition"] == "image" and summary["residual_bank"]["size"] == 6
  assert 0 < summary["residual_bank"]["cosine_to_row_mean"] <= 1
  with open(tmp_path / "gen" / "shards" / store_lib.SPEC_FILE) as f:
    assert len(json.load(f)["residual_bank"]) == 16  # the bank's digest: a rerun must match
  assert _shard_digests(str(tmp_path / "gen"))[0] != _shard_digests(base_dir)[0]
  assert base["condition"] == "row" and "residual_bank" not in base
  config.sample.residual_bank = 0  # same workdir, other conditions: the store refuses
  with pytest.raises(ValueError, match="residual_bank"):
    task.run(config, str(tmp_path / "gen"))


def test_stage2_weights_choose_the_ema_or_the_last_steps_own(runs):
  from vigface_jax import parallel  # pylint: disable=g-import-not-at-top
  from vigface_jax.generate import loading  # pylint: disable=g-import-not-at-top
  s1 = loading.load_stage1(runs["stage1"])
  mesh = parallel.create_mesh(("data", "fsdp", "model"), (1, 1, 1), devices=jax.devices()[:1])
  ema = loading.load_stage2(runs["stage2"], s1, mesh)
  raw = loading.load_stage2(runs["stage2"], s1, mesh, weights="raw")
  a, b = jax.tree.leaves(ema.params), jax.tree.leaves(raw.params)
  assert len(a) == len(b) and any(not np.array_equal(x, y) for x, y in zip(a, b))
  config = _config(runs)
  config.stage2.weights = "last"
  with pytest.raises(config_lib.ConfigError, match="stage2.weights"):
    task.validate(config)
