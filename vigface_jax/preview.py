"""The `preview` task: look at the embedded default data and measure how hard it is.

Writes into the workdir:
  * `contact_sheet.png`: rows of identities, columns of yaw; every cell is the face beside its
    landmark image (DESIGN §1), so pose, nuisance and landmarks can be checked by eye.
  * `verification/procedural.bin` (+ `.json` sidecar): insightface-format pairs over held-out
    identities with hard negatives (`data.pairs`).
  * `summary.json`, `metrics.jsonl`, TensorBoard events: renderer throughput and the
    verification accuracy of the trivial baselines (raw pixels, a random network) on the pack
    as written (JPEG round trip included).
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import parallel
from vigface_jax.data import faces
from vigface_jax.data import landmarks
from vigface_jax.evaluate import baselines
from vigface_jax.evaluate import pairs
from vigface_jax.evaluate import verification


def contact_sheet(seed: int, identities: list[int], yaws: list[float], gap: int = 2) -> np.ndarray:
  """uint8 [rows·(112+gap), cols·(224+gap), 3]: each cell is face | landmark image."""
  size = faces.IMAGE_SIZE
  cell_w, cell_h = 2 * size + gap, size + gap
  sheet = np.full((len(identities) * cell_h, len(yaws) * cell_w, 3), 255, np.uint8)
  for r, ident in enumerate(identities):
    for c, yaw in enumerate(yaws):
      image, points = faces.render_face(seed, ident, c, yaw=yaw)
      y, x = r * cell_h, c * cell_w
      sheet[y:y + size, x:x + size] = image
      sheet[y:y + size, x + size:x + 2 * size] = landmarks.render_landmark_image(points)
  return sheet


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a preview config once, before anything is rendered (ConfigError)."""
  config_lib.validate_parallelism(config)
  f = config_lib.Fields(config, "")
  f.int("seed", 0)
  sheet = f.sub("sheet")
  sheet.int("num_identities", 1)
  sheet.numbers("yaws")
  p = f.sub("pairs")
  for key in ("num_pairs", "num_folds", "identities_per_fold", "hard_negative_k"):
    p.int(key, 1)
  p.int("identity_offset", 0)
  p.choice("image_format", ("jpeg", "png"))
  b = f.sub("baselines")
  b.bool("enabled")
  b.int("batch_size", 1)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Renders the contact sheet and the verification pack, then scores the baselines."""
  validate(config)
  main = parallel.is_main_process()
  summary: dict[str, Any] = {"task": "preview", "seed": config.seed}
  sheet_ids = [pairs.HOLDOUT_OFFSET // 2 + i for i in range(config.sheet.num_identities)]
  sheet = contact_sheet(config.seed, sheet_ids, list(config.sheet.yaws))
  if main:
    Image.fromarray(sheet).save(os.path.join(workdir, "contact_sheet.png"))

  spec = pairs.PairSpec(seed=config.seed, num_pairs=config.pairs.num_pairs,
                        num_folds=config.pairs.num_folds,
                        identities_per_fold=config.pairs.identities_per_fold,
                        identity_offset=config.pairs.identity_offset,
                        hard_negative_k=config.pairs.hard_negative_k)
  items, issame = pairs.make_pairs(spec)
  start = time.perf_counter()
  images = pairs.render_items(config.seed, items, progress=main)
  seconds = time.perf_counter() - start
  summary["render_images_per_second"] = len(images) / seconds
  bin_path = os.path.join(workdir, "verification", "procedural.bin")
  if main:
    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    pairs.write_pack(bin_path, spec, items, issame, images, image_format=config.pairs.image_format)
  summary.update(bin_path=bin_path, num_pairs=int(len(issame)),
                 num_identities=int(len(np.unique(items[:, 0]))))

  if config.baselines.enabled and main:
    # Score the pack as written: the JPEG round trip is part of what a model would see.
    images, issame = verification.load_bin(bin_path)
    embedders = {"raw_pixels": baselines.raw_pixel_embedder(),
                 "random_network": baselines.random_network_embedder(config.seed)}
    for name, embed in embedders.items():
      emb = verification.flip_sum_embeddings(embed, images, config.baselines.batch_size)
      result = verification.evaluate(emb, issame, nrof_folds=config.pairs.num_folds)
      summary[f"baseline/{name}/accuracy"] = result["accuracy_mean"]
      summary[f"baseline/{name}/accuracy_std"] = result["accuracy_std"]
      summary[f"baseline/{name}/val_at_far1e-3"] = result["val"]
      logging.info("baseline %s: %.4f ± %.4f", name, result["accuracy_mean"],
                   result["accuracy_std"])

  with metrics_lib.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {k: v for k, v in summary.items() if isinstance(v, (int, float))
                             and k != "seed"})
    writer.write_image(0, "contact_sheet", sheet)
  metrics_lib.write_summary(workdir, summary)
  return summary
