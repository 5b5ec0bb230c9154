"""The `audit` task: the privacy audit alone, on any dataset in any supported format.

`config.dataset` names the dataset to audit (a data section: an exported generation run's
`imagefolder/`, `recordio/train.rec` or `arrayrecord/`, or any other identity-labelled set);
`config.training` the real training data it must not reproduce (default: the data of
`stage1.workdir`'s run); the encoders are the stage-1 export (when `stage1.workdir` is set)
and every `audit.encoders` backbone. The audit (`generate/audit.py`, `generate/report.py`)
writes `audit.json`, `audit_hist.png`, `audit_closest.png`, `audit_identities.csv` and
`summary.json` into the workdir.

The leak control here is new images of training people (people the gallery holds, in images
it does not): procedural training data renders `audit.heldout_images` new images of
`audit.leak_ids` training identities; real training data holds the last `heldout_images`
images of `leak_ids` identities (with enough images) out of the gallery and uses them as the
planted leak. An audit that cannot flag them is reported as not conclusive.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax import preemption
from vigface_jax.data import faces
from vigface_jax.data import pipeline
from vigface_jax.generate import loading
from vigface_jax.generate import report

REQUIRED_FIELDS = ("dataset.source",)
ConfigError = config_lib.ConfigError


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of an audit config once, before anything is read."""
  config_lib.validate_parallelism(config)
  f = config_lib.Fields(config, "")
  f.sub("stage1").str("workdir", optional=True)
  for section in ("dataset", "training"):
    value = f.get(section)
    if section == "training" and value is None:
      continue
    if not isinstance(value, ml_collections.ConfigDict):
      f.fail(section, "a data section (config_lib.data_config fields)", value)
    sub = f.sub(section)
    sub.choice("source", sorted(pipeline.SOURCES))
    if sub.get("source") != "procedural" and not sub.get("path"):
      sub.fail("path", "the dataset's location", sub.get("path"))
  report.validate_audit(f.sub("audit"))
  f.int("max_images", 1, optional=True)
  if not config.stage1.workdir and not tuple(config.audit.encoders):
    raise ConfigError("no encoder to audit with: set stage1.workdir (its export/ is one) and/or "
                      "audit.encoders (independent backbones, e.g. a configs/fr.py:auditor run)")
  if config.training is None and not config.stage1.workdir:
    raise ConfigError("training is not set and neither is stage1.workdir: the audit needs the "
                      "real training data (a data section) to compare the dataset with")


def _leak(config, data: ml_collections.ConfigDict, train_source: Any, labels: np.ndarray
          ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
  """(leak source, its indices, their true training labels, gallery indices kept)."""
  a = config.audit
  ids = np.unique(labels)
  count = min(int(a.leak_ids), len(ids))
  chosen = np.sort(np.random.default_rng(11).permutation(ids)[:count])
  per = int(a.heldout_images)
  if data.source == "procedural":
    # New renders of training people: image indices past the ones the training data holds.
    src = faces.ProceduralFaceSource(seed=int(data.seed), num_identities=int(
        data.num_identities), images_per_identity=int(data.images_per_identity) + per,
        identity_offset=int(data.identity_offset))
    base = int(data.images_per_identity)
    idx = (chosen[:, None] * src.images_per_identity + base + np.arange(per)[None]).reshape(-1)
    return src, idx, np.repeat(chosen, per), np.arange(len(labels))
  keep = np.ones(len(labels), bool)
  leak_idx, true = [], []
  for c in chosen:
    own = np.flatnonzero(labels == c)
    if len(own) <= per:
      continue  # too few images to spare some and keep the person in the gallery
    leak_idx.extend(own[-per:])
    true.extend([c] * per)
    keep[own[-per:]] = False
  if not leak_idx:
    raise ConfigError(f"audit.leak_ids: no training identity has more than audit.heldout_images"
                      f"={per} images to hold out as the leak control; lower heldout_images")
  return train_source, np.asarray(leak_idx), np.asarray(true), np.flatnonzero(keep)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  validate(config)
  s1_dir = config.stage1.workdir
  train_data = config.training
  if train_data is None:
    train_data = loading.load_stage1(s1_dir).config.data
  encs = report.encoders(config, s1_dir)
  generated = pipeline.build_source(config.dataset)
  n_gen = len(generated) if config.max_images is None else min(len(generated),
                                                               int(config.max_images))
  gen_labels = report.source_labels(generated, n_gen)
  if len(np.unique(gen_labels)) < 2:
    raise ConfigError(
        f"dataset ({config.dataset.source} {config.dataset.path}) has "
        f"{len(np.unique(gen_labels))} distinct label(s) in its first {n_gen} images: the "
        "audit compares identities, so the dataset needs identity labels (e.g. RecordIO packs "
        "with label 0 everywhere keep identities in a side file: data.label_file)")
  train_source = pipeline.build_source(train_data)
  train_labels = report.source_labels(train_source)
  leak_src, leak_idx, leak_true, gallery = _leak(config, train_data, train_source, train_labels)
  # Units of work: each image set's embeddings; a stop request is honoured between them.
  training = report.reference(encs, train_source, gallery, "training images")
  preemption.check("after embedding the training images", sync=True)
  heldout_src = report.heldout_source(config, train_data)
  heldout = report.reference(encs, heldout_src, np.arange(len(heldout_src)), "held-out people")
  preemption.check("after embedding the held-out people", sync=True)
  leak_ref = report.reference(encs, leak_src, leak_idx, "leak control")
  preemption.check("after embedding the leak control", sync=True)
  gen_ref = report.reference(encs, generated, np.arange(n_gen), "audited images")
  preemption.check("after embedding the audited images, before the audit", sync=True)
  summary: dict[str, Any] = {"task": "audit", "images": int(n_gen),
                             "identities": int(len(np.unique(gen_labels))),
                             "encoders": list(encs)}
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    # Each leak identity is labelled by the training person it shows.
    combined = report.run_audit(config, workdir, encs, gen_ref.emb, gen_ref.labels, training,
                                heldout, (leak_ref.emb, leak_true, leak_true), gen_ref.image)
    summary["audit"] = {k: combined[k] for k in ("verdict", "passed", "conclusive", "rates")}
    summary["audit"]["num_flagged"] = len(combined["flagged_labels"])
    metrics_lib.write_summary(workdir, summary)
    logging.info("audit: %s", summary["audit"]["verdict"])
  return summary
