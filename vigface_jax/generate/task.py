"""The `generate` task: stage 3 of VIGFace (DESIGN §1), a dataset of people who do not exist.

For each chosen row of the stage-1 class-centre table (virtual rows; real rows in augment
mode) the stage-2 DiT draws `images_per_id` faces, each under its own five-point landmark set
(`generate/poses.py`) with classifier-free guidance. Then, on process 0: the privacy audit
(`generate/report.py`, `generate/audit.py`) under the stage-1 network and every independent
encoder, with its leak control; the dataset metrics, generalisation and landmark-identity
checks; the contact sheet; and the export (`generate/export.py`) without the flagged
identities when `audit.drop_flagged`.

Determinism and resumption: image `(label, index)` draws its noise from
`sampling.image_keys(seed, label, index)` and its landmark set from the same triple, so the
dataset depends on neither batch size nor shard layout nor device count. Identities are
grouped into shards of `ids_per_shard`; each process draws the shards `s % P == p` on its own
devices (no communication: a local mesh per process) and writes each finished shard under a
temporary name, renamed and checksummed when complete (`generate/store.py`). A rerun after an
interruption (even SIGKILL) verifies the finished shards and draws only the rest. Encoding
and writing run on a background thread while the devices draw the next shard.

Beside the dataset, in `controls/`, the same sampler draws the audit's leak control
(identities from *real* rows, which the audit must flag), the generalisation check (fresh
procedural people neither stage saw, rows from the stage-1 network) and the landmark-identity
control (identities re-drawn under the other pose source); each is a resumable store too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax import preemption
from vigface_jax.data import pipeline
from vigface_jax.diffusion import samplers
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.evaluate import prototypes
from vigface_jax.generate import loading
from vigface_jax.generate import poses as poses_lib
from vigface_jax.generate import report
from vigface_jax.generate import sampling
from vigface_jax.generate import store as store_lib
from vigface_jax.models import stage2

REQUIRED_FIELDS = ("stage1.workdir", "stage2.workdir")
FORMATS = ("imagefolder", "recordio", "arrayrecord")
# Noise streams of the groups: the dataset uses `seed`, each control its own offset.
GROUP_SEEDS = {"dataset": 0, "leak": 1_000_003, "fresh": 2_000_003, "pool": 3_000_017}
ROW_SHAPES = ("span", "real")  # with row_span: as projected, or with the real rows' profile
JITTER_TAG = 0x4A17  # separates the row-jitter stream from the landmark stream of an image
RESIDUAL_TAG = 0x5E51  # the stream choosing each image's residual (condition = 'image')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a generation config once, before anything is built."""
  config_lib.validate_parallelism(config)
  f = config_lib.Fields(config, "")
  f.sub("stage1").str("workdir", optional=True)
  f.sub("stage2").str("workdir", optional=True)
  f.sub("stage2").choice("weights", ("ema", "raw"))
  rows = f.choice("rows", ("virtual", "real"))
  f.int("num_ids", 1, optional=rows == "real")
  f.int("images_per_id", 1, optional=rows == "real")
  f.int("augment_to", 1)
  f.choice("row_order", ("first", "random"))
  f.int("row_offset", 0)
  f.float("row_span", above=0.0, most=1.0, optional=True)
  f.int("row_relax_steps", 0)
  f.choice("row_shape", ROW_SHAPES)
  f.int("seed", 0)
  f.int("batch_size", 1)
  f.int("ids_per_shard", 1)
  f.choice("image_format", ("png", "jpeg"))
  f.int("jpeg_quality", 1)
  formats = f.get("formats")
  if (not isinstance(formats, (tuple, list)) or not formats
      or any(x not in FORMATS for x in formats) or len(set(formats)) != len(formats)):
    f.fail("formats", f"a non-empty tuple of distinct names from {FORMATS}", formats)
  s = f.sub("sample")
  s.int("num_steps", 1, optional=True)
  s.float("eta", 0.0, optional=True)
  if s.get("spacing") is not None:
    s.choice("spacing", samplers.SPACINGS)
  s.float("guidance", 0.0)
  if s.get("guidance_interval") is not None:
    s.numbers("guidance_interval", int, length=2)
  s.float("guidance_rescale", 0.0, most=1.0, optional=True)
  s.float("row_jitter", 0.0)
  s.int("residual_bank", 0)
  p = f.sub("pose")
  p.choice("source", ("model", "pool"))
  p.float("spread", above=0.0)
  p.int("num_components", 1)
  p.int("fit_images", 1)
  f.bool("run_audit")
  report.validate_audit(f.sub("audit"))
  c = f.sub("checks")
  for key in ("fresh_ids", "fresh_images", "fresh_centre_images", "pool_ids", "pool_images",
              "real_ids", "sheet_ids", "sheet_images"):
    c.int(key, 0)
  c.int("fresh_offset", 0)


@dataclasses.dataclass
class Group:
  """What one store holds: rows to draw, images per identity, where the poses come from."""

  name: str
  root: str  # the store's workdir
  rows: np.ndarray  # [num_ids, d] condition rows
  row_ids: np.ndarray  # [num_ids] row index in stage 1's table (real j → j, virtual j → n + j)
  counts: np.ndarray  # [num_ids] images per identity
  pose_source: str
  kind: str  # 'virtual' | 'real' | 'fresh'
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def project_rows(config: ml_collections.ConfigDict, s1: loading.Stage1
                 ) -> tuple[loading.Stage1, dict[str, Any] | None, np.ndarray | None]:
  """`s1` with its virtual rows inside the real rows' span when `row_span` is set (every
  consumer then sees the rows drawn), how far the drawn rows are from the real ones, and the
  span's orthonormal basis `[d, dims]` (None without `row_span`)."""
  energy = config.get("row_span")
  if energy is None and config.get("row_shape", "span") != "span":
    raise config_lib.ConfigError(f"row_shape={config.row_shape!r} needs row_span (the span "
                                 "whose directions it shapes); set row_span=0.99 or "
                                 "row_shape='span'")
  if energy is None or config.rows != "virtual":
    return s1, None, None
  try:
    virtual, basis = prototypes.project_to_real_span(s1.virtual, s1.real, float(energy))
  except ValueError as e:
    raise config_lib.ConfigError(f"row_span={energy}: {e}") from None
  steps, dims = int(config.get("row_relax_steps", 0)), basis.shape[1]
  virtual = prototypes.relax_in_span(virtual, (s1.real @ basis) @ basis.T, steps)
  shape = config.get("row_shape", "span")
  if shape == "real":  # after the relaxation, which moves rows into the real rows' weak directions
    virtual = prototypes.shape_like_real(virtual, s1.real, basis)
  sep = prototypes.separability(np.concatenate([s1.real, virtual]), len(s1.real), class_axis=0)
  return dataclasses.replace(s1, virtual=virtual), {
      "energy": float(energy), "dims": dims, "of": int(s1.real.shape[1]), "relax_steps": steps,
      "shape": shape,
      "nearest_real_to_virtual": sep["nearest_real_to_virtual"],
      "nearest_real_to_real": sep["nearest_real_to_real"], "verdict": sep["verdict"]}, basis


def jitter_rows(rows: np.ndarray, seed: int, labels: np.ndarray, indices: np.ndarray,
                scale: float, basis: np.ndarray | None = None) -> np.ndarray:
  """Each image's own condition row: its identity's row plus `scale` × a random unit-variance
  direction (inside `basis`'s span when given, else in the whole space), renormalised, so an
  image's row keeps cosine ≈ 1/√(1 + scale²) to its identity's. The noise of image `(label,
  index)` comes from `SeedSequence([seed, label, index, JITTER_TAG])`: independent of
  batching, sharding and of the image's diffusion noise and landmark set."""
  rows = np.asarray(rows, np.float32)
  if scale <= 0:
    return rows
  d = rows.shape[1] if basis is None else basis.shape[1]
  g = np.stack([np.random.default_rng(np.random.SeedSequence(
      [int(seed), int(a), int(b), JITTER_TAG])).standard_normal(d)
      for a, b in zip(np.asarray(labels).tolist(), np.asarray(indices).tolist())]) \
      if len(rows) else np.zeros((0, d))
  step = g if basis is None else g @ np.asarray(basis, np.float64).T
  unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  out = unit + float(scale) * step / np.sqrt(d)
  return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass
class ResidualBank:
  """Real training images' stage-1 features split about their class rows (for a DiT trained
  with `diffusion.condition = 'image'`): feature e_i = a_i · c_{y_i} + √(1 − a_i²) · u_i."""

  cosines: np.ndarray  # [R] a_i = e_i · c_{y_i}
  residuals: np.ndarray  # [R, d] unit u_i ⟂ c_{y_i}
  records: np.ndarray  # [R] the training records they came from

  def digest(self) -> str:
    return _digest(np.concatenate([self.cosines[:, None], self.residuals], axis=1))


def residual_bank(config: ml_collections.ConfigDict, s1: loading.Stage1, source: Any
                  ) -> ResidualBank:
  """`sample.residual_bank` training images (seeded choice) through the stage-1 network."""
  size = min(int(config.sample.residual_bank), len(source))
  records = np.sort(np.random.default_rng([int(config.seed), 13]).choice(
      len(source), size, replace=False))
  images, labels, _ = report.read(source, records, desc="residual bank")
  embed_fn = embed_lib.load_embedder(s1.workdir, batch_size=report.EMBED_BATCH)[0]
  return split_features(embed_fn(images), s1.real[labels], records)


def split_features(features: np.ndarray, centres: np.ndarray, records: np.ndarray
                   ) -> ResidualBank:
  """Features `[R, d]` about their class centres `[R, d]` → `ResidualBank`."""
  e = np.asarray(features, np.float64)
  e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  c = np.asarray(centres, np.float64)
  c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  a = np.clip(np.sum(e * c, axis=1), -1.0, 1.0)
  u = e - a[:, None] * c
  u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  return ResidualBank(a.astype(np.float32), u.astype(np.float32), np.asarray(records, np.int64))


def residual_rows(rows: np.ndarray, bank: ResidualBank | None, seed: int, labels: np.ndarray,
                  indices: np.ndarray) -> np.ndarray:
  """Each image's condition for a DiT trained on image features: its identity's unit row v
  with a bank entry's residual transplanted, a · v + √(1 − a²) · normalise(u − (u·v) v), so the
  image's condition sits as far from its row as that real image's feature sat from its own
  class row. The entry of image `(label, index)` comes from
  `SeedSequence([seed, label, index, RESIDUAL_TAG])` (independent of batching and sharding)."""
  rows = np.asarray(rows, np.float32)
  if bank is None or not len(rows):
    return rows
  pick = np.asarray([np.random.default_rng(np.random.SeedSequence(
      [int(seed), int(a), int(b), RESIDUAL_TAG])).integers(len(bank.cosines))
      for a, b in zip(np.asarray(labels).tolist(), np.asarray(indices).tolist())], np.int64)
  v = rows.astype(np.float64)
  v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
  u = bank.residuals[pick].astype(np.float64)
  u -= np.sum(u * v, axis=1, keepdims=True) * v
  u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
  a = bank.cosines[pick].astype(np.float64)[:, None]
  return (a * v + np.sqrt(np.maximum(1.0 - a * a, 0.0)) * u).astype(np.float32)


def plan_dataset(config: ml_collections.ConfigDict, s1: loading.Stage1, source: Any,
                 workdir: str) -> Group:
  """The dataset's rows: `num_ids` virtual rows (or real rows in augment mode)."""
  n, k = s1.real.shape[0], s1.virtual.shape[0]
  if config.rows == "virtual":
    num, skip = int(config.num_ids), int(config.get("row_offset", 0))
    if num + skip > k:
      raise config_lib.ConfigError(
          f"num_ids={num} + row_offset={skip} is more than the k={k} virtual rows of "
          f"stage1.workdir={s1.workdir} (its virtual.num_virtual): lower num_ids or "
          f"row_offset, or train stage 1 with k ≥ {num + skip}")
    order = (np.arange(k) if config.row_order == "first"
             else np.random.default_rng([int(config.seed), 7]).permutation(k))
    chosen = np.sort(order[skip:skip + num])
    return Group("dataset", workdir, s1.virtual[chosen], n + chosen,
                 np.full(num, int(config.images_per_id), np.int64), config.pose.source,
                 "virtual")
  have = np.bincount(report.source_labels(source), minlength=n)
  target = int(config.augment_to)
  classes = np.flatnonzero(have < target)
  if config.num_ids is not None:
    if int(config.num_ids) > len(classes):
      raise config_lib.ConfigError(
          f"num_ids={config.num_ids} but only {len(classes)} real classes have fewer than "
          f"augment_to={target} images")
    classes = classes[:int(config.num_ids)]
  counts = (np.full(len(classes), int(config.images_per_id), np.int64)
            if config.images_per_id is not None else target - have[classes])
  return Group("dataset", workdir, s1.real[classes], classes, counts, config.pose.source, "real")


def plan_controls(config: ml_collections.ConfigDict, s1: loading.Stage1, dataset: Group,
                  workdir: str, fresh_rows: np.ndarray | None) -> list[Group]:
  """The leak control, the fresh-people and the other-pose-source groups."""
  out = []
  per_id = int(np.max(dataset.counts)) if len(dataset.counts) else 1
  n = s1.real.shape[0]
  leak = min(int(config.audit.leak_ids), n) if config.run_audit else 0
  if leak:
    chosen = np.sort(np.random.default_rng([int(config.seed), 11]).permutation(n)[:leak])
    out.append(Group("leak", os.path.join(workdir, "controls", "leak"), s1.real[chosen], chosen,
                     np.full(leak, per_id, np.int64), config.pose.source, "real"))
  c = config.checks
  if fresh_rows is not None and len(fresh_rows):
    out.append(Group("fresh", os.path.join(workdir, "controls", "fresh"), fresh_rows,
                     np.full(len(fresh_rows), -1, np.int64),
                     np.full(len(fresh_rows), int(c.fresh_images), np.int64),
                     config.pose.source, "fresh"))
  pool_ids = min(int(c.pool_ids), len(dataset.rows))
  if pool_ids and int(c.pool_images):
    other = "pool" if config.pose.source == "model" else "model"
    out.append(Group("pool", os.path.join(workdir, "controls", "pose_" + other),
                     dataset.rows[:pool_ids], dataset.row_ids[:pool_ids],
                     np.full(pool_ids, int(c.pool_images), np.int64), other, dataset.kind))
  return out


class Drawer:
  """Draws groups through one compiled sampler on this process's devices."""

  def __init__(self, config: ml_collections.ConfigDict, run: loading.Stage2Run, mesh: Any,
               rules: Any, pose_model: poses_lib.PoseModel, pool: tuple[np.ndarray, np.ndarray],
               basis: np.ndarray | None = None, bank: ResidualBank | None = None):
    s2 = run.config.sample
    s = config.sample
    pick = lambda ours, theirs: theirs if ours is None else ours
    interval = pick(s.guidance_interval, s2.get("guidance_interval"))
    self.settings = sampling.SamplerSettings(
        num_steps=int(pick(s.num_steps, s2.num_steps)), eta=float(pick(s.eta, s2.eta)),
        spacing=str(pick(s.spacing, s2.spacing)), prediction=str(run.config.diffusion.prediction),
        guidance_interval=None if interval is None else tuple(int(v) for v in interval),
        guidance_rescale=float(pick(s.guidance_rescale, s2.get("guidance_rescale", 0.0))),
        skip_unguided=True)
    self.guidance = float(s.guidance)
    self.generator = sampling.Generator(run.graphdef, run.schedule, self.settings,
                                        batch_size=int(config.batch_size), mesh=mesh,
                                        state_shardings=run.shardings, rules=rules,
                                        per_example_keys=True)
    self.run = run
    self.seed = int(config.seed)
    self.ids_per_shard = int(config.ids_per_shard)
    self.image_format = config.image_format
    self.quality = int(config.jpeg_quality)
    self.pose_model, self.pool = pose_model, pool
    self.row_jitter = float(s.get("row_jitter", 0.0))
    self.pose_spread = float(config.pose.get("spread", 1.0))
    self.basis = basis
    self.bank = bank

  def spec(self, group: Group) -> dict[str, Any]:
    """What must match for a rerun to continue a store (else ValueError from the store)."""
    spec = {"counts": [int(c) for c in group.counts]} if len(np.unique(group.counts)) > 1 else {}
    if self.row_jitter:  # only when set, so stores drawn before these options still resume
      spec["row_jitter"] = self.row_jitter
    if self.pose_spread != 1.0:
      spec["pose_spread"] = self.pose_spread
    if self.bank is not None:
      spec["residual_bank"] = self.bank.digest()
    return {**spec, "group": group.name, "num_ids": int(len(group.rows)),
            "images_per_id": int(group.counts.max()), "image_format": self.image_format,
            "quality": self.quality, "rows_sha": _digest(group.rows),
            "ids_per_shard": self.ids_per_shard, "seed": self.seed + GROUP_SEEDS[group.name],
            "pose_source": group.pose_source, "guidance": self.guidance, "sampler": dataclasses.asdict(self.settings),
            "stage2_step": self.run.step, "stage2_workdir": self.run.workdir}

  def open(self, group: Group) -> store_lib.ShardStore:
    return store_lib.ShardStore(group.root, spec=self.spec(group))

  def draw(self, group: Group) -> tuple[store_lib.ShardStore, int]:
    """Draws every pending shard of `group` of this process; returns its store and the number
    of images drawn."""
    store = self.open(group)
    todo = store.pending(jax.process_index(), jax.process_count())
    total = int(sum(store.shard_count(s) for s in todo))
    seed = self.seed + GROUP_SEEDS[group.name]
    logging.info("%s: %d identities, %d shards (%d to draw here, %d images)", group.name,
                 len(group.rows), store.num_shards, len(todo), total)
    if not todo:
      return store, 0
    bar = tqdm.tqdm(total=total, desc=f"generate {group.name}", unit="img", smoothing=0.1)
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    writing = None
    try:
      for done, s in enumerate(todo):
        if done and preemption.requested():  # the shard before this one is written, then stop
          writing.result()
          preemption.check(f"after {done} of the {len(todo)} shards of {group.name} this "
                           f"process was drawing (each finished shard is in {store.directory} "
                           "and its manifest)")
        ids = np.asarray(list(store.shard_labels(s)), np.int64)
        labels = np.repeat(ids, group.counts[ids])
        indices = np.concatenate([np.arange(c) for c in group.counts[ids]]).astype(np.int64)
        keys = sampling.image_keys(seed, labels, indices)
        points, owner = poses_lib.draw(group.pose_source, seed, labels, indices,
                                       model=self.pose_model, pool=self.pool,
                                       spread=self.pose_spread)
        rows = jitter_rows(group.rows[labels], seed, labels, indices, self.row_jitter,
                           self.basis)
        rows = residual_rows(rows, self.bank, seed, labels, indices)
        images = self._sample(rows, stage2.model_landmarks(points), keys, bar)
        if writing is not None:
          writing.result()  # at most one shard waits for its encoding
        writing = writer.submit(store.write_shard, s, images, labels=labels, indices=indices,
                                rows=group.row_ids[labels], seeds=np.full(len(labels), seed),
                                landmarks=points, extra={"owner": owner})
      if writing is not None:
        writing.result()
    finally:
      writer.shutdown(wait=True)
      bar.close()
    return store, total

  def _sample(self, rows: np.ndarray, lmk: np.ndarray, keys: np.ndarray, bar) -> np.ndarray:
    """Images of one shard (`Generator.draw`: batches dispatched one ahead of the host copy)."""
    return self.generator.draw(self.run.params, self.run.rest, rows, lmk, keys, self.guidance,
                               progress=bar.update)


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Draws the dataset and its controls, audits, measures and exports (see the docstring)."""
  validate(config)
  tick = time.time()
  s1 = loading.load_stage1(config.stage1.workdir)
  s1, span, basis = project_rows(config, s1)
  rules = config.sharding_rules
  # Each process draws its own shards on its own devices.
  mesh = parallel.mesh_from_config(config, devices=jax.local_devices())
  run2 = loading.load_stage2(config.stage2.workdir, s1, mesh, rules,
                             weights=config.stage2.weights)
  train_source = pipeline.build_source(s1.config.data)
  dataset = plan_dataset(config, s1, train_source, workdir)
  pose_model, pool = report.fit_poses(config, train_source, workdir)
  fresh = report.fresh_people(config, s1)
  groups = [dataset] + plan_controls(config, s1, dataset, workdir,
                                     None if fresh is None else fresh.rows)
  bank = None
  condition = run2.config.diffusion.get("condition", "row")
  if condition == "image" and int(config.sample.get("residual_bank", 0)):
    bank = residual_bank(config, s1, train_source)
  drawer = Drawer(config, run2, mesh, rules, pose_model, pool, basis, bank)
  timings, drawn_here = {}, {}
  for group in groups:
    preemption.check("between groups, before drawing " + group.name)
    t0 = time.time()
    drawn_here[group.name] = drawer.draw(group)[1]
    timings[group.name] = time.time() - t0
  preemption.check("after drawing, before the audit and the export")
  parallel.sync("generate:drawn")
  drawn = int(sum(g.counts.sum() for g in groups))
  summary: dict[str, Any] = {
      "task": "generate", "num_ids": int(len(dataset.rows)), "rows": config.rows,
      "images": int(dataset.counts.sum()), "sampler": dataclasses.asdict(drawer.settings),
      "guidance": drawer.guidance, "row_jitter": drawer.row_jitter,
      "pose_spread": drawer.pose_spread, "stage2_step": run2.step, "draw_seconds": timings,
      "devices_per_process": len(jax.local_devices()), "processes": jax.process_count()}
  if span:
    summary["row_span"] = span
  summary["condition"] = condition
  if bank is not None:
    summary["residual_bank"] = {
        "size": int(len(bank.cosines)), "cosine_to_row_mean": float(bank.cosines.mean()),
        "cosine_to_row_p05": float(np.percentile(bank.cosines, 5))}
  summary["drawn_this_run"] = drawn_here  # this process; 0 where a rerun found shards done
  if drawn_here["dataset"]:
    summary["images_per_s"] = float(drawn_here["dataset"] / max(timings["dataset"], 1e-9))
  # Every process loads the encoders: Orbax's restore meets the other processes at a barrier.
  encs = report.encoders(config, s1.workdir)
  if parallel.is_main_process():
    summary.update(report.finish(config, workdir, s1, train_source, dataset, groups, encs,
                                 fresh, pool))
    summary["total_drawn_images"] = drawn
    summary["wall_s"] = time.time() - tick
    metrics_lib.write_summary(workdir, summary)
    logging.info("generate: %s", {k: summary[k] for k in ("num_ids", "images") if k in summary})
  parallel.sync("generate:done")
  return summary

