"""The `fr` task: stage 1 of VIGFace (DESIGN §1), an IResNet with real + virtual class centres.

Each step embeds a real batch, fabricates `b_v = round(k·b_r/n)` virtual embeddings around
randomly drawn virtual centres with the running per-dimension spread σ of the real ones
(`margin.virtual_embeddings`), and takes one margin-softmax step over all `n + k` centres
with the class axis sharded (`margin.margin_softmax_loss`). Virtual embeddings carry no
gradient into the backbone; they only push the virtual centres away from every other centre.

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
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import pairs
from vigface_jax.data import pipeline
from vigface_jax.evaluate import baselines
from vigface_jax.evaluate import embed as embed_lib
from vigface_jax.evaluate import prototypes
from vigface_jax.evaluate import verification
from vigface_jax.models import iresnet
from vigface_jax.models import margin as margin_lib
from vigface_jax.train import loop
from vigface_jax.train import state as state_lib

_MARGINS = ("arcface", "cosface", "combined", "adaface")


class AdaFaceBuffer(nnx.Variable):
  """AdaFace running (mean, std) of feature norms; not a parameter."""


def compute_dtype(name: str) -> Any:
  """'auto' → bfloat16 on GPU/TPU, float32 on CPU; otherwise the named dtype."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


class FaceRecognizer(nnx.Module):
  """Backbone + class centres `[embed_dim, n + k]` (+ the AdaFace norm statistics)."""

  def __init__(self, model: Any, num_real: int, num_virtual: int, *, margin_name: str,
               rngs: nnx.Rngs):
    self.input_size = int(model.get("input_size", 112))
    self.backbone = iresnet.IResNet(
        model.arch, embed_dim=int(model.embed_dim), dropout=float(model.get("dropout", 0.0)),
        input_size=self.input_size, dtype=compute_dtype(model.get("dtype", "auto")),
        rngs=rngs)
    self.head = margin_lib.ClassCentres(int(model.embed_dim), num_real, num_virtual, rngs=rngs)
    self.adaface = (AdaFaceBuffer(jnp.stack(margin_lib.AdaFaceStats.init()))
                    if margin_name == "adaface" else None)

  def embed(self, images: jax.Array) -> jax.Array:
    """uint8 `[b, 112, 112, 3]` aligned faces → float32 `[b, embed_dim]` (not normalised)."""
    return self.backbone(iresnet.prepare(images, self.input_size))


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


def fr_loss(model: FaceRecognizer, batch: dict[str, jax.Array], rng: jax.Array, *,
            cfg: Any, logits_sharding: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Margin softmax over real rows plus the step's virtual rows (DESIGN §1)."""
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
  loss_r, aux_r = margin_lib.margin_softmax_loss(emb, head.weight[...], labels, real_fn,
                                                 logits_sharding)
  if "margin_state" in aux_r:
    model.adaface[...] = jnp.stack(aux_r["margin_state"])
  metrics["accuracy"] = aux_r["accuracy"]
  metrics["loss_real"] = loss_r
  b_r = labels.shape[0]
  b_v = int(cfg.virtual.get("per_step") or margin_lib.num_virtual_per_step(k, b_r, n)) if k else 0
  if b_v == 0:
    return loss_r, metrics
  emb_v, labels_v, sigma = margin_lib.virtual_embeddings(
      rng, margin_lib.l2_normalize(emb), labels, head.normalized(), head.sigma[...], n, k,
      alpha=cfg.virtual.alpha, num_per_step=b_v)
  head.sigma[...] = sigma
  loss_v, aux_v = margin_lib.margin_softmax_loss(emb_v, head.weight[...], labels_v, fn,
                                                 logits_sharding)
  metrics.update(loss_virtual=loss_v, accuracy_virtual=aux_v["accuracy"],
                 sigma_mean=jnp.mean(sigma))
  # One softmax over b_r + b_v rows: the mean over all of them.
  return (loss_r * b_r + loss_v * b_v) / (b_r + b_v), metrics


def num_real_classes(config: ml_collections.ConfigDict, source: Any) -> int:
  """`model.num_real` if set, else the source's `num_classes`."""
  n = config.model.get("num_real")
  if n is None:
    n = getattr(source, "num_classes", None)
  if not n:
    raise config_lib.ConfigError(
        f"cannot tell the number of real identities of data.source={config.data.source!r}; "
        "set model.num_real")
  return int(n)


def check_data(config: ml_collections.ConfigDict) -> None:
  """ConfigError unless the data source can be built (a path for the file sources)."""
  data = config.data
  if data.source != "procedural" and not data.get("path"):
    raise config_lib.ConfigError(
        f"data.path is not set: task {config.task!r} trains on a face dataset you keep (data.source="
        f"{data.source!r}, e.g. CASIA-WebFace's train.rec from insightface); pass "
        "--config.data.path=/path/to/faces_webface_112x112/train.rec, or use "
        f"--config=configs/{config.task}.py:demo for procedural faces")


def _check_bins(config: ml_collections.ConfigDict) -> None:
  for bin_path in config.eval.get("bins", ()) or ():
    if not os.path.exists(bin_path):
      raise config_lib.ConfigError(f"eval.bins: {bin_path} does not exist")


def _verification_packs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """name → .bin path: `eval.bins` plus the procedural pairs (written here if configured)."""
  packs = {os.path.splitext(os.path.basename(p))[0]: p for p in config.eval.get("bins", ()) or ()}
  spec_cfg = config.eval.get("procedural_pairs")
  if spec_cfg:
    path = os.path.join(workdir, "verification", "procedural.bin")
    if not os.path.exists(path):
      spec = pairs.PairSpec(seed=int(config.data.seed), **spec_cfg.to_dict())
      if parallel.is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pairs.write_pairs(path, spec, image_format="jpeg")
      parallel.sync("procedural_pairs")
    packs["procedural"] = path
  return packs


def make_verification_hook(config, mesh, rules, packs: dict[str, str]):
  """A `loop.Hook` factory scoring the (EMA) backbone on every pack."""
  loaded = {name: verification.load_bin(path) for name, path in packs.items()}
  batch = int(config.eval.batch_size)
  data_sharding = parallel.batch_sharding(mesh, rules)

  def factory(setup: state_lib.Setup):
    @jax.jit
    def embed(params, rest, images):
      model = nnx.merge(setup.graphdef, params, rest)
      model.eval()
      return model.embed(images)

    def fn(step: int, state: state_lib.TrainState) -> dict[str, float]:
      del step
      params = state.ema if state.ema is not None else state.params

      def embed_fn(x: np.ndarray) -> jax.Array:
        x = jax.make_array_from_callback(x.shape, data_sharding, lambda idx: x[idx])
        return embed(params, state.rest, x)

      out = {}
      for name, (images, issame) in loaded.items():
        emb = verification.flip_sum_embeddings(embed_fn, images, batch)
        result = verification.evaluate(emb, issame)
        out[f"{name}/accuracy"] = result["accuracy_mean"]
        out[f"{name}/accuracy_std"] = result["accuracy_std"]
        out[f"{name}/val_at_far1e-3"] = result["val"]
      return out

    return [loop.Hook("verify", int(config.eval.every), fn)] if loaded else []

  return factory


REQUIRED_FIELDS = ("data.source", "train.num_steps", "model.arch")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains stage 1, exports the backbone and writes the prototype report."""
  check_data(config)
  _check_bins(config)
  if config.margin.name not in _MARGINS:
    raise config_lib.ConfigError(f"margin.name={config.margin.name!r} is not one of {_MARGINS}")
  rules = config.get("sharding_rules", parallel.DEFAULT_RULES)
  mesh = parallel.mesh_from_config(config)
  packs = _verification_packs(config, workdir)
  data = pipeline.make_pipeline(config, mesh, rules)
  n = num_real_classes(config, data.source)
  k = int(config.virtual.num_virtual)
  logging.info("stage 1: %d real + %d virtual identities, %s on mesh %s", n, k,
               config.model.arch, dict(mesh.shape))
  create = functools.partial(FaceRecognizer, config.model, n, k, margin_name=config.margin.name)
  logits_sharding = parallel.logical_sharding(mesh, ("batch", "classes"), rules)
  loss_fn = functools.partial(fr_loss, cfg=config, logits_sharding=logits_sharding)
  summary: dict[str, Any] = {"task": "fr", "num_real": n, "num_virtual": k,
                             "arch": config.model.arch}
  with data, metrics_lib.MetricWriter(workdir) as writer:
    result = loop.fit(config, workdir, mesh=mesh, create_model=create, loss_fn=loss_fn,
                      data=data, images_per_step=int(config.data.global_batch_size),
                      make_hooks=make_verification_hook(config, mesh, rules, packs),
                      writer=writer)
    summary.update({k_: v for k_, v in result.metrics.items()})
    model = state_lib.merge(result.setup.graphdef, result.state, use_ema=True)
    model.eval()
    # export/ is this run's own output: rewrite it, so re-running a finished (or resumed)
    # workdir ends cleanly instead of stopping at "already holds a backbone".
    embed_lib.save_backbone(os.path.join(workdir, "export"), model.backbone,
                            arch=config.model.arch, embed_dim=int(config.model.embed_dim),
                            input_size=model.input_size, force=True)
    # Every process: with the class axis sharded across hosts, write_report gathers first.
    report = prototypes.write_report(workdir, model.head.weight[...], n) or {}
    if report:
      summary["separability"] = report.get("verdict", report)
    if "procedural" in packs and config.eval.get("baselines", True) and parallel.is_main_process():
      images, issame = verification.load_bin(packs["procedural"])
      emb = verification.flip_sum_embeddings(baselines.raw_pixel_embedder(), images, 200)
      summary["baseline/raw_pixels/accuracy"] = verification.evaluate(emb, issame)[
          "accuracy_mean"]
    writer.write_scalars(int(config.train.num_steps),
                         {k_: v for k_, v in summary.items() if k_.startswith("baseline/")})
  metrics_lib.write_summary(workdir, summary)
  return summary
