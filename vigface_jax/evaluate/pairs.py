"""Verification pairs over held-out procedural identities, written as insightface `.bin` packs.

The layout follows LFW's: `num_folds` contiguous folds, each over its own disjoint set of
identities and each half genuine, half impostor pairs, so the 10-fold protocol of
`evaluate.verification.evaluate` (KFold without shuffling) never tests on identities it chose a
threshold on. Impostor pairs are *hard negatives*: the second identity is one of the
`hard_negative_k` identities of the fold whose look-alike factors (skin, hair, beard, head
shape: `faces.Identity.vector`) are nearest to the first. Held-out identities start at
`identity_offset` (default 10⁶), far away from the identities a training source uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np
import tqdm

from vigface_jax.data import faces
from vigface_jax.evaluate import verification

HOLDOUT_OFFSET = 1_000_000


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """How to draw the pairs (all defaults are what `configs/preview.py` uses)."""

  seed: int = 0
  num_pairs: int = 3000
  num_folds: int = 10
  identities_per_fold: int = 60
  identity_offset: int = HOLDOUT_OFFSET
  hard_negative_k: int = 3
  max_image_index: int = 100_000


def make_pairs(spec: PairSpec) -> tuple[np.ndarray, np.ndarray]:
  """Chooses the pairs.

  Returns:
    (items int64 [2N, 2] of (identity, image index), issame bool [N]); pair i is items 2i, 2i+1.
  """
  per_fold = spec.num_pairs // spec.num_folds
  if spec.num_pairs <= 0 or spec.num_pairs % (2 * spec.num_folds):
    raise ValueError(f"pairs.num_pairs={spec.num_pairs} must be a positive multiple of "
                     f"2 × pairs.num_folds = {2 * spec.num_folds} (equal genuine and impostor "
                     "pairs in every fold)")
  if spec.identities_per_fold <= spec.hard_negative_k:
    raise ValueError(f"pairs.identities_per_fold={spec.identities_per_fold} must exceed "
                     f"pairs.hard_negative_k={spec.hard_negative_k}")
  rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 31337]))
  items, issame = [], []
  for fold in range(spec.num_folds):
    ids = spec.identity_offset + fold * spec.identities_per_fold + np.arange(
        spec.identities_per_fold)
    vec = np.stack([faces.identity(spec.seed, int(i)).vector for i in ids]).astype(np.float64)
    dist = ((vec[:, None] - vec[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :spec.hard_negative_k]
    fold_items, fold_same = [], []
    for genuine in (True, False):
      for _ in range(per_fold // 2):
        a = int(rng.integers(len(ids)))
        b = a if genuine else int(nearest[a, rng.integers(spec.hard_negative_k)])
        ia, ib = rng.choice(spec.max_image_index, size=2, replace=False)
        fold_items += [(ids[a], ia), (ids[b], ib)]
        fold_same.append(genuine)
    # Interleave genuine and impostor pairs inside the fold (the fold stays contiguous).
    order = rng.permutation(per_fold)
    pairs = np.asarray(fold_items, np.int64).reshape(per_fold, 2, 2)[order]
    items.append(pairs.reshape(-1, 2))
    issame.append(np.asarray(fold_same)[order])
  return np.concatenate(items), np.concatenate(issame)


def render_items(seed: int, items: np.ndarray, progress: bool = False) -> np.ndarray:
  """Renders `(identity, index)` items → uint8 [len(items), 112, 112, 3]."""
  out = np.empty((len(items), faces.IMAGE_SIZE, faces.IMAGE_SIZE, 3), np.uint8)
  for k, (ident, index) in enumerate(tqdm.tqdm(items, desc="render pairs", disable=not progress,
                                              unit="img")):
    out[k] = faces.render_face(seed, int(ident), int(index))[0]
  return out


def write_pack(path: str | os.PathLike, spec: PairSpec, items: np.ndarray, issame: np.ndarray,
               images: np.ndarray, *, image_format: str = "jpeg") -> dict[str, Any]:
  """Writes rendered pairs as an insightface `.bin` pack plus a JSON sidecar `<path>.json`.

  The sidecar records the spec and every (identity, index) item, so any pack can be
  regenerated or audited.

  Returns:
    The sidecar's content.
  """
  verification.write_bin(path, images, issame, image_format=image_format)
  meta = {"spec": dataclasses.asdict(spec), "image_format": image_format,
          "num_identities": int(len(np.unique(items[:, 0]))),
          "items": items.tolist(), "issame": np.asarray(issame).tolist()}
  tmp = f"{os.fspath(path)}.json.tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f)
  os.replace(tmp, f"{os.fspath(path)}.json")
  logging.info("wrote %d pairs (%d identities) to %s", len(issame), meta["num_identities"], path)
  return meta


def write_pairs(path: str | os.PathLike, spec: PairSpec, *, image_format: str = "jpeg",
                progress: bool = False) -> dict[str, Any]:
  """`make_pairs` → `render_items` → `write_pack`; returns the sidecar's content."""
  items, issame = make_pairs(spec)
  images = render_items(spec.seed, items, progress=progress)
  return write_pack(path, spec, items, issame, images, image_format=image_format)
