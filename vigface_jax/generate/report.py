"""After the drawing: the privacy audit, the dataset metrics, the checks, the sheet, the export.

Shared by the `generate` task (`generate/task.py`) and the stand-alone `audit` task
(`generate/audit_task.py`). What is measured, and against what:

* **Encoders**: the stage-1 network (the one stage 2's identity loss optimised against, so not
  a fair judge on its own) and every independent encoder of `audit.encoders` (e.g. a
  `configs/fr.py:auditor` run: other people, seed and architecture). Every figure is reported
  per encoder.
* **Real references**: the training data of stage 1 (every image), a held-out population of
  people in no training set (procedural: fresh identities at `audit.heldout_offset`; real
  data: the gallery `audit.heldout` names), and for the dataset metrics `checks.real_ids`
  training identities with as many images as a generated identity.
* **Audit** (`generate/audit.py`): thresholds calibrated on the real data, class- and
  image-level statistics, the leak control (identities drawn from real rows), the verdict;
  `audit.json`, `audit_hist.png`, `audit_closest.png`, `audit_identities.csv`.
* **Dataset metrics** (`evaluate/dataset_metrics.py`): identity consistency, separability,
  diversity, realism (linear real-vs-generated classifier, Fréchet distance), and the
  distance of each virtual identity from its own row under the stage-1 network.
* **Generalisation** (procedural data): fresh people neither stage saw, rows from the stage-1
  network; their drawn images identified under each encoder among the fresh people's own
  other images.
* **Landmark identity**: how often generated images are recognised as the person whose
  landmark set they were drawn with ('pool' sets: the set's owner; 'model' sets: the owner of
  the nearest training set), beside chance and beside what landmark sets alone identify.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import ops
from vigface_jax import parallel
from vigface_jax.data import faces
from vigface_jax.data import pipeline
from vigface_jax.evaluate import dataset_metrics
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.generate import audit as audit_lib
from vigface_jax.generate import export as export_lib
from vigface_jax.generate import poses as poses_lib
from vigface_jax.generate import store as store_lib

ConfigError = config_lib.ConfigError
EMBED_BATCH = 256
RENDER_CHUNK = 512


def validate_audit(a: config_lib.Fields) -> None:
  """The `audit` section (`config_lib.audit_config`)."""
  encoders = a.get("encoders")
  if not isinstance(encoders, (tuple, list)) or not all(isinstance(e, str) for e in encoders):
    a.fail("encoders", "a tuple of backbone directories", encoders)
  q = a.float("quantile", above=0.0, most=1.0)
  if q >= 1.0:
    a.fail("quantile", "a number in (0, 1)", q)
  fmrs = a.numbers("fmrs")
  if not fmrs or not all(0 < v < 1 for v in fmrs):
    a.fail("fmrs", "a non-empty tuple of false-match rates in (0, 1)", fmrs)
  a.int("max_impostor_pairs", 1)
  a.float("min_control", 0.0, most=1.0)
  a.bool("drop_flagged")
  a.int("query_chunk", 1)
  a.int("heldout_ids", 4)
  a.int("heldout_images", 1)
  a.int("heldout_offset", 0)
  heldout = a.get("heldout")
  if heldout is not None and not isinstance(heldout, ml_collections.ConfigDict):
    a.fail("heldout", "None or a data section (config_lib.data_config fields)", heldout)
  a.int("leak_ids", 0)


# -- reading and embedding -------------------------------------------------------------------


def _read_chunk(source: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  images = np.empty((len(indices), 112, 112, 3), np.uint8)
  labels = np.empty(len(indices), np.int64)
  points = np.zeros((len(indices), 5, 2), np.float32)
  for k, i in enumerate(indices):
    r = source[int(i)]
    images[k], labels[k] = r["image"], int(r["label"])
    if bool(r.get("has_landmarks", False)):
      points[k] = r["landmarks"]
  return images, labels, points


def read(source: Any, indices: np.ndarray, *, desc: str, workers: int = 2
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, landmarks) of `source` records `indices`; procedural faces are rendered
  by `workers` spawned processes (the renderer is pure numpy, one core each). Spawned workers
  import the caller's `__main__`: a script calling this must guard its entry point
  (`if __name__ == "__main__":`, as `vigface_jax.main` does)."""
  indices = np.asarray(indices, np.int64)
  chunks = [indices[i:i + RENDER_CHUNK] for i in range(0, len(indices), RENDER_CHUNK)]
  parts = []
  bar = tqdm.tqdm(total=len(indices), desc=desc, unit="img")
  parallel_ok = workers > 1 and isinstance(source, faces.ProceduralFaceSource) and len(chunks) > 1
  if parallel_ok:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      for part in pool.map(_read_chunk, [source] * len(chunks), chunks):
        parts.append(part)
        bar.update(len(part[1]))
  else:
    for chunk in chunks:
      parts.append(_read_chunk(source, chunk))
      bar.update(len(chunk))
  bar.close()
  if not parts:
    return (np.zeros((0, 112, 112, 3), np.uint8), np.zeros(0, np.int64),
            np.zeros((0, 5, 2), np.float32))
  return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def source_labels(source: Any, n: int | None = None) -> np.ndarray:
  """int64 labels of `source`'s first `n` records (default all), without decoding images where
  the source knows them: its `.labels` (RecordIO, ImageFolder, a store), procedural faces by
  arithmetic; other sources read every record."""
  n = len(source) if n is None else int(n)
  labels = getattr(source, "labels", None)
  if labels is not None:
    return np.asarray(labels, np.int64)[:n]
  if isinstance(source, faces.ProceduralFaceSource):
    return np.arange(n, dtype=np.int64) // source.images_per_identity
  return np.asarray([int(source[i]["label"]) for i in range(n)], np.int64)


def encoders(config: ml_collections.ConfigDict, stage1_workdir: str | None
             ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
  """`{'stage1': embed_fn, <name>: embed_fn, ...}`: the stage-1 export (if a workdir is
  given) and `audit.encoders`."""
  out = {}
  if stage1_workdir:
    out["stage1"] = embed_lib.load_embedder(stage1_workdir, batch_size=EMBED_BATCH)[0]
  for i, path in enumerate(config.audit.encoders):
    try:
      fn, info = embed_lib.load_embedder(path, batch_size=EMBED_BATCH)
    except ValueError as e:
      raise ConfigError(f"audit.encoders[{i}]={path}: {e}") from None
    name = os.path.basename(os.path.normpath(path)) or f"encoder{i}"
    if name in out:
      name = f"{name}_{i}"
    out[name] = fn
    logging.info("audit encoder %s: %s", name, info)
  return out


def embed(encs: dict[str, Callable], images: np.ndarray) -> dict[str, np.ndarray]:
  return {name: fn(images) for name, fn in encs.items()}


def independent(encs: dict[str, Any]) -> str:
  """The encoder headline figures use: the first independent one, else stage 1."""
  names = [n for n in encs if n != "stage1"]
  return names[0] if names else "stage1"


# -- poses and fresh people -------------------------------------------------------------------


def fit_poses(config: ml_collections.ConfigDict, source: Any, workdir: str
              ) -> tuple[poses_lib.PoseModel, tuple[np.ndarray, np.ndarray]]:
  """The pose model fitted on `pose.fit_images` training landmark sets, and those sets (the
  'pool', with their identities); the model is saved as `pose_model.npz`."""
  n = len(source)
  count = min(int(config.pose.fit_images), n)
  idx = np.sort(np.random.default_rng([int(config.seed), 5]).permutation(n)[:count])
  labels, points = [], []
  for i in tqdm.tqdm(idx, desc="training landmark sets", unit="img"):
    r = source[int(i)]
    if bool(r.get("has_landmarks", False)):
      labels.append(int(r["label"]))
      points.append(np.asarray(r["landmarks"], np.float32))
  if len(points) < poses_lib.MIN_SETS:
    raise ConfigError(
        f"the stage-1 training data has landmark sets for only {len(points)} of {count} "
        f"sampled images (pose.fit_images): the pose model needs at least {poses_lib.MIN_SETS};"
        " give the data a landmarks file (data.landmarks_file, `python -m vigface_jax."
        "landmarks`)")
  points, labels = np.stack(points), np.asarray(labels, np.int64)
  model = poses_lib.PoseModel.fit(points, int(config.pose.num_components), int(config.seed))
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    model.save(os.path.join(workdir, "pose_model.npz"))
  return model, (points, labels)


@dataclasses.dataclass
class Fresh:
  """People neither stage saw: procedural identities, their rows and reference images."""

  ids: np.ndarray  # procedural identity ids
  rows: np.ndarray  # [F, d] unit rows from the stage-1 network
  centre_images: int  # images per person giving the row; as many more are the references
  seed: int

  def images(self, references: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images, person index) of the row images (0..per−1 of each person) or the
    references (per..2·per−1)."""
    per = self.centre_images
    source = faces.ProceduralFaceSource(seed=self.seed, num_identities=len(self.ids),
                                        images_per_identity=2 * per,
                                        identity_offset=int(self.ids[0]))
    idx = (np.arange(len(self.ids))[:, None] * 2 * per + per * references
           + np.arange(per)[None]).reshape(-1)
    images, labels, _ = read(source, idx, desc="fresh people " + (
        "(references)" if references else "(row images)"))
    return images, labels


def fresh_people(config: ml_collections.ConfigDict, s1: Any) -> Fresh | None:
  """Rows for `checks.fresh_ids` fresh procedural people: the normalised mean stage-1
  embedding of `checks.fresh_centre_images` images each (procedural data only)."""
  c = config.checks
  data = s1.config.data
  if data.source != "procedural" or not int(c.fresh_ids) or not int(c.fresh_images):
    return None
  fresh = Fresh(ids=int(c.fresh_offset) + np.arange(int(c.fresh_ids)), rows=np.zeros(0),
                centre_images=int(c.fresh_centre_images), seed=int(data.seed))
  images, labels = fresh.images(references=False)
  emb = embed_lib.load_embedder(s1.workdir, batch_size=EMBED_BATCH)[0](images)
  fresh.rows = np.stack([ops.l2_normalize_np(emb[labels == i].mean(0), axis=0)
                         for i in range(len(fresh.ids))]).astype(np.float32)
  return fresh


def _top1_among(emb: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray
                ) -> dict[str, float]:
  ids, centres = audit_lib.centres(ref, ref_labels)
  e = ops.l2_normalize_np(emb, axis=1)
  cos = e @ centres.T
  pos = np.searchsorted(ids, labels)
  return {"top1": float(np.mean(np.argmax(cos, 1) == pos)),
          "mean_cos_own": float(np.mean(cos[np.arange(len(e)), pos])),
          "chance": 1.0 / len(ids), "num_identities": int(len(ids)), "num_images": int(len(e))}


def generalisation(encs: dict[str, Callable], fresh: Fresh, store_root: str) -> dict[str, Any]:
  """Drawn images of fresh people identified among the fresh people's own other images."""
  drawn = store_lib.StoreSource(store_root)
  images = np.stack([drawn[i]["image"] for i in range(len(drawn))])
  labels = np.asarray(drawn.original_labels, np.int64)
  ref, ref_labels = fresh.images(references=True)
  # The ceiling: the fresh people's row images identified among the same references.
  row_images, row_labels = fresh.images(references=False)
  out = {}
  for name, fn in encs.items():
    e_ref = fn(ref)
    out[name] = {"generated": _top1_among(fn(images), labels, e_ref, ref_labels),
                 "real_images": _top1_among(fn(row_images), row_labels, e_ref, ref_labels)}
  return out


# -- the real references ---------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
  """Real images under every encoder: embeddings, labels, landmarks, and a way to fetch one."""

  emb: dict[str, np.ndarray]
  labels: np.ndarray
  points: np.ndarray
  source: Any
  indices: np.ndarray

  def image(self, i: int) -> np.ndarray:
    return np.asarray(self.source[int(self.indices[i])]["image"])


def reference(encs: dict[str, Callable], source: Any, indices: np.ndarray, desc: str,
              chunk: int = 8192) -> Reference:
  """Embeds `source` records `indices` under every encoder, `chunk` images at a time (the
  images themselves are not kept)."""
  embs: dict[str, list[np.ndarray]] = {n: [] for n in encs}
  labels, points = [], []
  for start in range(0, len(indices), chunk):
    images, lab, pts = read(source, indices[start:start + chunk], desc=desc)
    for name, fn in encs.items():
      embs[name].append(fn(images))
    labels.append(lab)
    points.append(pts)
  return Reference(emb={n: np.concatenate(v) for n, v in embs.items()},
                   labels=np.concatenate(labels), points=np.concatenate(points), source=source,
                   indices=np.asarray(indices))


def heldout_source(config: ml_collections.ConfigDict, train_data: Any) -> Any:
  """People outside the training set: fresh procedural identities, or the named gallery."""
  a = config.audit
  if a.heldout is not None:
    return pipeline.build_source(a.heldout)
  if train_data.source != "procedural":
    raise ConfigError(
        "audit.heldout is not set: with real training data the audit needs a gallery of people "
        "who are not in it (a data section, e.g. --config.audit.heldout.source=imagefolder "
        "--config.audit.heldout.path=/data/gallery)")
  return faces.ProceduralFaceSource(seed=int(train_data.seed),
                                    num_identities=int(a.heldout_ids),
                                    images_per_identity=int(a.heldout_images),
                                    identity_offset=int(a.heldout_offset))


def audit_options(config: ml_collections.ConfigDict) -> audit_lib.AuditOptions:
  a = config.audit
  return audit_lib.AuditOptions(quantile=float(a.quantile), fmrs=tuple(float(v) for v in a.fmrs),
                                verdict_fmr=float(a.fmrs[0]),
                                max_pairs=int(a.max_impostor_pairs),
                                min_control=float(a.min_control),
                                query_chunk=int(a.query_chunk))


def run_audit(config, workdir: str, encs: dict[str, Callable], generated: dict[str, np.ndarray],
              gen_labels: np.ndarray, training: Reference, heldout: Reference,
              leak: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None,
              gen_image: Callable[[int], np.ndarray], rows: dict[int, int] | None = None
              ) -> dict[str, Any]:
  """The audit under every encoder; writes its four files; returns the combined report."""
  options = audit_options(config)
  reports = {}
  for name in encs:
    leak_e = None
    if leak is not None:
      leak_e = audit_lib.Embedded(leak[0][name], leak[1], true_labels=leak[2])
    reports[name] = audit_lib.audit_encoder(
        name, generated=audit_lib.Embedded(generated[name], gen_labels),
        training=audit_lib.Embedded(training.emb[name], training.labels),
        heldout=audit_lib.Embedded(heldout.emb[name], heldout.labels), leak=leak_e,
        options=options)
  combined = audit_lib.combine(reports)
  audit_lib.write_json(os.path.join(workdir, "audit.json"), combined)
  audit_lib.write_identities_csv(os.path.join(workdir, "audit_identities.csv"), reports,
                                 rows=rows)
  audit_lib.write_histograms(os.path.join(workdir, "audit_hist.png"), reports)
  judge = independent(encs)
  audit_lib.write_closest(os.path.join(workdir, "audit_closest.png"),
                          audit_lib.closest_pairs(reports[judge], 16), gen_image, training.image,
                          n=16)
  return combined


def contact_sheet(path: str, generated: np.ndarray, real: np.ndarray, rows: int, cols: int
                  ) -> None:
  """Paper Figure 4: `rows` generated identities × `cols` images, a white rule, then as many
  real training identities (the same data the models learned from) for comparison."""
  size = 112
  gap = 6
  sheet = np.full((2 * rows * size + gap, cols * size, 3), 255, np.uint8)
  for block, imgs in enumerate((generated, real)):
    top = block * (rows * size + gap)
    for r in range(rows):
      for c in range(cols):
        k = r * cols + c
        if k < len(imgs):
          sheet[top + r * size:top + (r + 1) * size, c * size:(c + 1) * size] = imgs[k]
  Image.fromarray(sheet).save(path)


def sheet_images(source: Any, labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """The first `cols` images of the first `rows` labels of a label-major source."""
  out = []
  for lab in np.unique(labels)[:rows]:
    idx = np.flatnonzero(labels == lab)[:cols]
    out.extend(np.asarray(source[int(i)]["image"]) for i in idx)
  return np.stack(out) if out else np.zeros((0, 112, 112, 3), np.uint8)


def save_json(workdir: str, name: str, content: Any) -> None:
  metrics_lib.write_json(os.path.join(workdir, name), content)


def _store_arrays(root: str) -> tuple[store_lib.StoreSource, np.ndarray]:
  src = store_lib.StoreSource(root)
  images = np.stack([src[i]["image"] for i in range(len(src))]) if len(src) else None
  return src, images


def _landmark_identity(encs, emb_by_group: dict[str, dict[str, np.ndarray]], points_by_group,
                       owners_by_group, sources: dict[str, str], training: Reference,
                       pool: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """How often an image is recognised as the owner of its landmark set, per pose source."""
  pool_points, pool_labels = pool
  centres = {name: audit_lib.centres(training.emb[name], training.labels) for name in encs}
  out: dict[str, Any] = {"landmarks_alone": poses_lib.landmark_identifiability(pool_points,
                                                                               pool_labels)}
  for group, source in sources.items():
    dist, nearest = poses_lib.nearest_pool_distance(points_by_group[group], pool_points,
                                                    return_index=True)
    # 'pool' sets are owned by whom they were copied from; a model draw by the nearest set's.
    owners = owners_by_group[group] if source == "pool" else pool_labels[nearest]
    entry: dict[str, Any] = {"group": group,
                             "nearest_training_set_rms_px_p50": float(np.median(dist))}
    for name in encs:
      ids, c = centres[name]
      entry[name] = poses_lib.owner_identification(emb_by_group[group][name], owners, c, ids)
    out[source] = entry
  same = poses_lib.same_identity_distance(training.points, training.labels)
  out["same_person_rms_px_p50"] = float(np.nanmedian(same))
  return out


def finish(config: ml_collections.ConfigDict, workdir: str, s1: Any, train_source: Any,
           dataset: Any, groups: list, encs: dict[str, Callable], fresh: Fresh | None,
           pool: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
  """Process 0, after every shard is drawn: audit, metrics, checks, sheet, export; `encs` from
  `encoders` (loaded on every process)."""
  out: dict[str, Any] = {}
  judge = independent(encs)
  # The dataset is embedded a chunk at a time (VIGFace(L) holds 6M images); images that a
  # figure shows are read back from the store.
  gen_src = store_lib.StoreSource(dataset.root)
  gen_labels = np.asarray(gen_src.original_labels, np.int64)
  gen_emb = reference(encs, gen_src, np.arange(len(gen_src)), "generated images").emb
  n_train = len(train_source)
  training = reference(encs, train_source, np.arange(n_train), "training images")
  by_group = {g.name: g for g in groups}
  emb_by_group = {"dataset": gen_emb}
  points_by_group = {"dataset": np.asarray(gen_src.landmarks)}
  owners_by_group = {"dataset": np.asarray(gen_src.extra.get("owner",
                                                             np.full(len(gen_src), -1)))}
  flagged: list[int] = []
  if config.run_audit:
    heldout_src = heldout_source(config, s1.config.data)
    heldout = reference(encs, heldout_src, np.arange(len(heldout_src)), "held-out people")
    leak = None
    if "leak" in by_group:
      leak_src, leak_images = _store_arrays(by_group["leak"].root)
      leak_labels = np.asarray(leak_src.original_labels, np.int64)
      true = np.asarray(by_group["leak"].row_ids)[leak_labels]
      leak = (embed(encs, leak_images), leak_labels, true)
    combined = run_audit(config, workdir, encs, gen_emb, gen_labels, training, heldout, leak,
                         lambda i: np.asarray(gen_src[int(i)]["image"]),
                         rows={i: int(r) for i, r in enumerate(dataset.row_ids)})
    flagged = sorted(int(x) for x in combined.get("flagged_labels", []))
    out["audit"] = {k: combined[k] for k in ("verdict", "passed", "conclusive", "encoders",
                                             "rates")}
    out["audit"]["num_flagged"] = len(flagged)
  # Dataset metrics: generated beside real training identities with as many images.
  per_id = int(np.max(dataset.counts))
  real_ids = np.unique(training.labels)[:int(config.checks.real_ids)]
  pick = np.concatenate([np.flatnonzero(training.labels == i)[:per_id] for i in real_ids])
  metrics: dict[str, Any] = {}
  for name in encs:
    metrics[name] = {
        "generated": dataset_metrics.summarize(gen_emb[name], gen_labels,
                                               points_by_group["dataset"]),
        "real": dataset_metrics.summarize(training.emb[name][pick], training.labels[pick],
                                          training.points[pick]),
        "realism": dataset_metrics.realism(training.emb[name], gen_emb[name]),
    }
  rows_table = np.concatenate([s1.real, s1.virtual])
  metrics["stage1"]["own_row"] = dataset_metrics.own_row(
      gen_emb["stage1"], gen_labels, rows_table[np.asarray(dataset.row_ids)])
  out["metrics"] = metrics
  if fresh is not None and "fresh" in by_group:
    out["generalisation"] = generalisation(encs, fresh, by_group["fresh"].root)
  sources = {"dataset": dataset.pose_source}
  if "pool" in by_group:
    p_src, p_images = _store_arrays(by_group["pool"].root)
    emb_by_group["pool"] = embed(encs, p_images)
    points_by_group["pool"] = np.asarray(p_src.landmarks)
    owners_by_group["pool"] = np.asarray(p_src.extra.get("owner", np.full(len(p_src), -1)))
    sources["pool"] = by_group["pool"].pose_source
  out["landmark_identity"] = _landmark_identity(encs, emb_by_group, points_by_group,
                                                owners_by_group, sources, training, pool)
  c = config.checks
  if int(c.sheet_ids) and int(c.sheet_images):
    contact_sheet(os.path.join(workdir, "contact_sheet.png"),
                  sheet_images(gen_src, gen_labels, int(c.sheet_ids), int(c.sheet_images)),
                  np.stack([training.image(i) for i in np.concatenate(
                      [np.flatnonzero(training.labels == lab)[:int(c.sheet_images)]
                       for lab in real_ids[:int(c.sheet_ids)]])]),
                  int(c.sheet_ids), int(c.sheet_images))
  exclude = flagged if (config.run_audit and config.audit.drop_flagged) else []
  kinds = [{"drawn_from": f"{dataset.kind} row"} for _ in dataset.row_ids]
  exports = export_lib.export(workdir, tuple(config.formats), exclude_labels=exclude,
                              image_format=config.image_format, quality=int(config.jpeg_quality),
                              identities=kinds)
  out["verify_export"] = export_lib.verify_export(workdir, tuple(config.formats))
  store_lib.write_manifest(workdir, exports=exports)
  out["exported_ids"] = int(len(dataset.rows) - len(exclude))
  out["dropped_ids"] = int(len(exclude))
  out["judge"] = judge
  save_json(workdir, "report.json", out)
  return out
