"""The `fr` task: stage 1 of VIGFace (DESIGN §1), an IResNet with real + virtual class centres.

Each step embeds a real batch, fabricates `b_v = round(k·b_r/n)` virtual embeddings around
randomly drawn virtual centres with the running per-dimension spread σ of the real ones
(`margin.virtual_embeddings`), and takes one margin-softmax step over all `n + k` centres
with the class axis sharded (`margin.margin_softmax_loss`). Virtual embeddings carry no
gradient into the backbone; they only push the virtual centres away from every other centre.
Above ~1M identities `margin.sample_rate < 1` runs both softmaxes over a Partial FC sample of
the centres; a class count the model axis does not divide gets padding columns
(`model.class_multiple`), masked out of the softmax and dropped from the reports.

Writes into the workdir (besides the trainer's checkpoints, metrics and TensorBoard events):
  `export/`                the backbone (`evaluate.embed.save_backbone`), loadable by
                           `evaluate.embed.load_embedder` and by later stages;
  `prototypes.npz`, `separability.json`, `prototype_similarity.png`: the prototype report
                           (`evaluate.prototypes.write_report`), the privacy criterion at
                           prototype level;
  `verification/*.bin`     the procedural pairs, when `eval.procedural_pairs` is set;
  `summary.json`           final verification accuracies, baselines, separability verdict.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import pipeline
from vigface_jax.evaluate import baselines
from vigface_jax.evaluate import common as evaluators_lib
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.evaluate import pairs
from vigface_jax.evaluate import prototypes
from vigface_jax.evaluate import verification
from vigface_jax.models import face_recognizer
from vigface_jax.models import iresnet
from vigface_jax.models import margin as margin_lib
from vigface_jax.train import compile_only
from vigface_jax.train import loop
from vigface_jax.train import optim
from vigface_jax.train import state as state_lib

_MARGINS = ("arcface", "cosface", "combined", "adaface")


def margin_fn(cfg: Any):
  """`(cos, labels) -> logits` for `config.margin` (AdaFace is handled in `fr_loss`)."""
  name = cfg.name
  if name == "arcface":
    return functools.partial(margin_lib.arcface, s=cfg.s, m=cfg.m)
  if name == "cosface":
    return functools.partial(margin_lib.cosface, s=cfg.s, m=cfg.m)
  if name == "combined":
    return functools.partial(margin_lib.combined_margin, s=cfg.s, m1=cfg.m1, m2=cfg.m, m3=cfg.m3)
  if name == "adaface":  # virtual rows: their norm is 1 by construction, so plain ArcFace
    return functools.partial(margin_lib.arcface, s=cfg.s, m=cfg.m)
  raise config_lib.ConfigError(f"margin.name={name!r} is not one of {_MARGINS}")


def fr_loss(model: face_recognizer.FaceRecognizer, batch: dict[str, jax.Array],
            rng: jax.Array, *, cfg: Any, logits_sharding: Any = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Margin softmax over real rows plus the step's virtual rows (DESIGN §1).

  With `margin.sample_rate < 1` both softmaxes run over the same Partial FC sample of the
  centres (`margin.sample_columns`, per block of the class axis as `logits_sharding` splits
  it): every class of the step's real and virtual rows plus sampled negatives. Padding columns
  of the head (present when the class count does not divide its shards) are masked out either
  way.
  """
  head = model.head
  n, k = head.num_real, head.num_virtual
  labels = batch["label"]
  emb = model.embed(batch["image"])
  fn = margin_fn(cfg.margin)
  metrics: dict[str, jax.Array] = {}
  if cfg.margin.name == "adaface":
    stats = margin_lib.AdaFaceStats(*model.adaface[...])
    real_fn = functools.partial(
        margin_lib.adaface, norms=jnp.linalg.norm(emb.astype(jnp.float32), axis=-1),
        stats=stats, m=cfg.margin.m, h=cfg.margin.h, s=cfg.margin.s)
  else:
    real_fn = fn
  b_r = labels.shape[0]
  b_v = int(cfg.virtual.per_step or margin_lib.num_virtual_per_step(k, b_r, n)) if k else 0
  rate = float(cfg.margin.get("sample_rate", 1.0))
  rng_v, rng_s = jax.random.split(rng) if rate < 1.0 else (rng, None)
  if b_v:
    emb_v, labels_v, sigma = margin_lib.virtual_embeddings(
        rng_v, margin_lib.l2_normalize(emb), labels, head.normalized(), head.sigma[...], n, k,
        alpha=cfg.virtual.alpha, num_per_step=b_v)
    head.sigma[...] = sigma
  if rate < 1.0:
    seen = jnp.concatenate([labels, labels_v]) if b_v else labels
    cols = margin_lib.sample_columns(rng_s, head.weight[...], seen, num_classes=n + k,
                                     sample_rate=rate, logits_sharding=logits_sharding)
    metrics["sampled_classes"] = jnp.sum(cols.valid.astype(jnp.float32))
  else:
    cols = margin_lib.all_columns(head.weight[...], n + k)
  masked = cols.valid if rate < 1.0 or head.num_padding else None

  def softmax(e, y, margin):
    if rate < 1.0:
      y = margin_lib.column_labels(y, cols.ids)
    return margin_lib.margin_softmax_loss(e, cols.centres, y, margin, logits_sharding,
                                          valid_columns=masked)

  loss_r, aux_r = softmax(emb, labels, real_fn)
  if "margin_state" in aux_r:
    model.adaface[...] = jnp.stack(aux_r["margin_state"])
  metrics["accuracy"] = aux_r["accuracy"]
  metrics["loss_real"] = loss_r
  if b_v == 0:
    return loss_r, metrics
  loss_v, aux_v = softmax(emb_v, labels_v, fn)
  metrics.update(loss_virtual=loss_v, accuracy_virtual=aux_v["accuracy"],
                 sigma_mean=jnp.mean(sigma))
  # One softmax over b_r + b_v rows: the mean over all of them.
  return (loss_r * b_r + loss_v * b_v) / (b_r + b_v), metrics


EVALUATORS = ("verification",)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a stage-1 config once, before anything is built (ConfigError)."""
  config_lib.validate_parallelism(config, dry_run_task=True)
  pipeline.validate(config)
  f = config_lib.Fields(config, "")
  model = f.sub("model")
  if model.get("arch") not in iresnet.VARIANTS:
    model.fail("arch", f"one of {sorted(iresnet.VARIANTS)}", model.get("arch"))
  model.int("embed_dim", 1)
  if model.int("input_size", 16) % 16:
    model.fail("input_size", "a multiple of 16", model.get("input_size"))
  model.float("dropout", 0.0, most=1.0)
  model.str("dtype")
  model.int("num_real", 1, optional=True)
  model.int("class_multiple", 1, optional=True)
  margin = f.sub("margin")
  if margin.get("name") not in _MARGINS:
    raise config_lib.ConfigError(f"margin.name={margin.get('name')!r} is not one of {_MARGINS}")
  margin.float("s", above=0.0)
  for key in ("m", "m1", "m3", "h"):
    margin.float(key)
  margin.float("sample_rate", above=0.0, most=1.0)
  virtual = f.sub("virtual")
  virtual.int("num_virtual", 0)
  virtual.float("alpha", 0.0, most=1.0)
  virtual.int("per_step", 1, optional=True)
  optim.validate(f.sub("optim"))
  loop.validate(f.sub("train"))
  evaluators_lib.validate(config.evals, EVALUATORS)



def _verification_packs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """name → .bin path: `evals.verify.bins` plus the procedural pairs (written here if set)."""
  verify = config.evals.verify
  packs = {os.path.splitext(os.path.basename(p))[0]: p for p in verify.bins or ()}
  spec_cfg = verify.procedural_pairs
  if spec_cfg:
    path = os.path.join(workdir, "verification", "procedural.bin")
    if parallel.is_main_process() and not os.path.exists(path):
      spec = pairs.PairSpec(seed=int(config.data.seed), **spec_cfg.to_dict())
      os.makedirs(os.path.dirname(path), exist_ok=True)
      pairs.write_pairs(path, spec, image_format="jpeg")
    # Every process, whether or not the pack existed: a process that saw it already written
    # would otherwise skip this barrier and meet the others at a different one.
    parallel.sync("procedural_pairs")
    packs["procedural"] = path
  return packs


def class_padding(config: ml_collections.ConfigDict, mesh, num_classes: int) -> int:
  """Padding columns that round `num_classes` up to `model.class_multiple` (None: the number
  of devices the class axis is split over on `mesh`, so any class count splits)."""
  multiple = config.model.get("class_multiple") or parallel.axis_size(
      mesh, "classes", config.sharding_rules)
  return -int(num_classes) % int(multiple)


def create_model(config: ml_collections.ConfigDict, num_real: int, num_virtual: int,
                 num_padding: int = 0):
  """`create(rngs=...)` building the stage-1 `FaceRecognizer` of `config.model`."""
  m = config.model
  return functools.partial(
      face_recognizer.FaceRecognizer, m.arch, embed_dim=int(m.embed_dim), num_real=num_real,
      num_virtual=num_virtual, num_padding=num_padding, input_size=int(m.input_size),
      dropout=float(m.dropout), dtype=face_recognizer.compute_dtype(m.dtype),
      adaface=config.margin.name == "adaface")


REQUIRED_FIELDS = ("data.source", "train.num_steps", "model.arch")


def _loss_fn(config: ml_collections.ConfigDict, mesh) -> state_lib.LossFn:
  """`fr_loss` with the [b, C] logits split as `head_batch` × `classes`."""
  logits_sharding = parallel.logical_sharding(mesh, ("head_batch", "classes"),
                                              config.sharding_rules)
  return functools.partial(fr_loss, cfg=config, logits_sharding=logits_sharding)


def dry_run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  """`--config.dry_run=True`: the stage-1 step compiled for `mesh`, nothing trained or read.

  The class count is `model.num_real` when set, else the source's own (for RecordIO only its
  `property` file is opened; procedural faces know theirs).
  """
  config = compile_only.for_target(config, mesh)
  n = config.model.num_real
  if n is None:
    try:
      n = pipeline.num_classes(config, pipeline.build_source(config.data))
    except (OSError, ValueError) as e:
      raise config_lib.ConfigError(
          f"dry run: cannot read the number of identities of data.path="
          f"{config.data.path!r} ({e}); set model.num_real (CASIA-WebFace: 10572)") from None
  k = int(config.virtual.num_virtual)
  pad = class_padding(config, mesh, int(n) + k)
  figures = compile_only.compile_train_step(config, mesh=mesh,
                                            create_model=create_model(config, int(n), k, pad),
                                            loss_fn=_loss_fn(config, mesh))
  figures.update(num_real=int(n), num_virtual=k, num_padding=pad, arch=config.model.arch,
                 sample_rate=float(config.margin.sample_rate), compute_dtype=config.model.dtype)
  return compile_only.report("fr", figures, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains stage 1, exports the backbone and writes the prototype report."""
  validate(config)
  if config.dry_run:
    return dry_run(config, workdir, compile_only.dry_run_mesh(config))
  rules = config.sharding_rules
  mesh = parallel.mesh_from_config(config)
  packs = _verification_packs(config, workdir)
  data = pipeline.make_pipeline(config, mesh, rules)
  n = pipeline.num_classes(config, data.source)
  k = int(config.virtual.num_virtual)
  pad = class_padding(config, mesh, n + k)
  logging.info("stage 1: %d real + %d virtual identities (+%d padding columns), %s on mesh %s",
               n, k, pad, config.model.arch, dict(mesh.shape))
  loss_fn = _loss_fn(config, mesh)
  summary: dict[str, Any] = {"task": "fr", "num_real": n, "num_virtual": k, "num_padding": pad,
                             "arch": config.model.arch}

  def make_evaluators(setup: state_lib.Setup) -> list[evaluators_lib.Evaluator]:
    context = {"setup": setup, "mesh": mesh, "rules": rules, "packs": packs}
    return evaluators_lib.from_config(config.evals, context)

  with data, metrics_lib.MetricWriter(workdir) as writer:
    result = loop.fit(config, workdir, mesh=mesh,
                      create_model=create_model(config, n, k, pad),
                      loss_fn=loss_fn, data=data,
                      images_per_step=int(config.data.global_batch_size),
                      make_evaluators=make_evaluators, writer=writer)
    summary.update(result.metrics)
    model = state_lib.merge(result.setup.graphdef, result.state, use_ema=True)
    model.eval()
    # export/ is this run's own output: rewrite it, so re-running a finished (or resumed)
    # workdir ends cleanly instead of stopping at "already holds a backbone".
    embed_lib.save_backbone(os.path.join(workdir, "export"), model.backbone,
                            arch=config.model.arch, embed_dim=int(config.model.embed_dim),
                            input_size=model.input_size, force=True)
    # Every process: with the class axis sharded across hosts, write_report gathers first.
    report = prototypes.write_report(workdir, model.head.weight[...], n,
                                     num_classes=n + k) or {}
    if report:
      summary["separability"] = report.get("verdict", report)
    if ("procedural" in packs and config.evals.verify.baselines
        and parallel.is_main_process()):
      images, issame = verification.load_bin(packs["procedural"])
      emb = verification.flip_sum_embeddings(baselines.raw_pixel_embedder(), images, 200)
      summary["baseline/raw_pixels/accuracy"] = verification.evaluate(emb, issame)[
          "accuracy_mean"]
    writer.write_scalars(int(config.train.num_steps),
                         {k_: v for k_, v in summary.items() if k_.startswith("baseline/")})
  metrics_lib.write_summary(workdir, summary)
  return summary
