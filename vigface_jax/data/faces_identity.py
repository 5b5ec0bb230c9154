"""Procedural faces: the identity factors and their sampling.

An identity of the `faces` renderer (DESIGN §4) is a vector of shape, colour and texture
factors drawn from `SeedSequence([seed, identity])`: `IDENTITY_FACTORS` names the uniform
draws, `identity(seed, identity_id)` maps them to head-space geometry, colours (skin, hair,
iris, lips from piecewise-linear ramps), moles and a window of the shared texture field, and
returns them as a frozen, cached `Identity`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Mapping

import numpy as np

from vigface_jax.data.faces_raster import _F32, _TEX, _TEXTURE_FIELD, _unit

IDENTITY_FACTORS = (
    "head_w", "head_h", "head_d", "skin_tone", "skin_red", "eye_dx", "eye_y", "eye_rx",
    "eye_ry", "eye_tilt", "iris_hue", "iris_dark", "brow_thick", "brow_arch", "brow_gap",
    "brow_dark", "nose_len", "nose_w", "nose_protrude", "nostril", "mouth_y", "mouth_w",
    "lip_thick", "lip_red", "hair_dark", "hair_red", "hair_grey", "hairline", "hairline_curve",
    "hair_volume", "hair_len", "fringe", "bald", "beard", "beard_extent", "moles", "freckles",
    "blush", "ear_size", "texture",
)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Identity factors (head units: the head half-width is about 1).

  `vector` holds the factors that a person would call "similar looking" (skin, hair, head
  shape, beard), normalised to [0, 1]; verification pairs use it to pick hard negatives.
  """

  p: Mapping[str, Any]  # read-only view: identities are cached and shared
  skin: np.ndarray  # float32 [3]
  hair: np.ndarray  # float32 [3]
  iris: np.ndarray  # float32 [3]
  lips: np.ndarray  # float32 [3]
  texture: np.ndarray  # float32 [_TEX, _TEX], zero-mean skin/hair texture
  moles: np.ndarray  # float32 [m, 3]: hx, hy, radius
  vector: np.ndarray  # float32 [d]


def _lerp3(stops: np.ndarray, t: float) -> np.ndarray:
  """Piecewise-linear colour ramp through `stops` [k, 3] at t in [0, 1]."""
  t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
  i = min(int(t), len(stops) - 2)
  f = t - i
  return (stops[i] * (1 - f) + stops[i + 1] * f).astype(_F32)


_SKIN = np.array([[0.97, 0.84, 0.74], [0.90, 0.70, 0.56], [0.76, 0.55, 0.40],
                  [0.55, 0.37, 0.25], [0.33, 0.21, 0.14]], np.float64)
_HAIR = np.array([[0.93, 0.82, 0.56], [0.62, 0.45, 0.25], [0.35, 0.22, 0.12],
                  [0.12, 0.08, 0.06], [0.04, 0.03, 0.03]], np.float64)
_IRIS = np.array([[0.30, 0.50, 0.78], [0.40, 0.55, 0.35], [0.50, 0.40, 0.20],
                  [0.30, 0.18, 0.10], [0.12, 0.08, 0.06]], np.float64)


# 2,048 identities × 16 KiB of texture: small enough for every grain worker to hold a copy.
@functools.lru_cache(maxsize=2048)
def identity(seed: int, identity_id: int) -> Identity:
  """The identity factors of `identity_id` under `seed` (cached; pure function)."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(identity_id), 7919]))
  u = {name: float(v) for name, v in zip(IDENTITY_FACTORS, rng.random(len(IDENTITY_FACTORS)))}
  p = {
      "head_w": 0.80 + 0.16 * u["head_w"],
      "head_h": 1.10 + 0.22 * u["head_h"],
      "head_d": 0.85 + 0.18 * u["head_d"],
      "eye_dx": 0.275 + 0.10 * u["eye_dx"],
      "eye_y": -0.16 + 0.14 * u["eye_y"],
      "eye_rx": 0.10 + 0.05 * u["eye_rx"],
      "eye_ry": 0.042 + 0.03 * u["eye_ry"],
      "eye_tilt": -0.18 + 0.36 * u["eye_tilt"],
      "iris_r": 0.45 + 0.15 * u["iris_dark"],
      "brow_thick": 0.022 + 0.045 * u["brow_thick"],
      "brow_arch": 0.0 + 0.08 * u["brow_arch"],
      "brow_gap": 0.11 + 0.09 * u["brow_gap"],
      "brow_dark": 0.35 + 0.6 * u["brow_dark"],
      "nose_len": 0.22 + 0.16 * u["nose_len"],
      "nose_w": 0.075 + 0.07 * u["nose_w"],
      "nose_protrude": 0.13 + 0.16 * u["nose_protrude"],
      "nostril": 0.018 + 0.02 * u["nostril"],
      "mouth_y": 0.55 + 0.17 * u["mouth_y"],
      "mouth_w": 0.20 + 0.11 * u["mouth_w"],
      "lip_thick": 0.035 + 0.035 * u["lip_thick"],
      "hairline": -0.92 + 0.38 * u["hairline"],
      "hairline_curve": -0.25 + 0.55 * u["hairline_curve"],
      "hair_volume": 0.04 + 0.22 * u["hair_volume"],
      "hair_len": -0.2 + 1.6 * u["hair_len"] ** 2,
      "fringe": u["fringe"] < 0.18,
      "fringe_y": -0.55 + 0.3 * u["brow_gap"],
      "bald": u["bald"] < 0.08,
      "beard": u["beard"] < 0.25,
      "beard_density": 0.35 + 0.6 * u["beard_extent"],
      "beard_top": 0.25 + 0.25 * u["beard_extent"],
      "freckles": max(0.0, u["freckles"] - 0.75) * 2.4,
      "blush": 0.08 * u["blush"],
      "ear_size": 0.17 + 0.12 * u["ear_size"],
  }
  skin = _lerp3(_SKIN, u["skin_tone"])
  red = -0.04 + 0.08 * u["skin_red"]
  skin = _unit(skin + np.array([red, 0.0, -red], _F32)).astype(_F32)
  grey = max(0.0, u["hair_grey"] - 0.8) * 4.0
  hair = _lerp3(_HAIR, u["hair_dark"])
  hair = hair + np.array([0.12, 0.02, -0.04], _F32) * (u["hair_red"] - 0.3)
  hair = _unit(hair * (1 - grey) + _F32(0.72) * grey).astype(_F32)
  iris = _lerp3(_IRIS, u["iris_hue"])
  lips = np.clip(skin * _F32(0.7) + np.array([0.2, -0.03, -0.01], _F32) * (0.6 + u["lip_red"]),
                 0, 1).astype(_F32)
  n_moles = int(u["moles"] * 4.0)
  moles = np.stack([rng.uniform(-0.6, 0.6, n_moles), rng.uniform(-0.5, 0.8, n_moles),
                    rng.uniform(0.012, 0.03, n_moles)], -1).astype(_F32).reshape(-1, 3)
  # A window of one shared noise field: as random as a fresh table, ~0.3 ms cheaper, which
  # matters when shuffled training meets more identities than the cache holds.
  ty, tx = rng.integers(0, _TEXTURE_FIELD.shape[0] - _TEX, 2)
  texture = np.ascontiguousarray(_TEXTURE_FIELD[ty:ty + _TEX, tx:tx + _TEX])
  vector = np.array([u["skin_tone"], u["skin_red"], u["hair_dark"], u["hair_red"], grey,
                     float(p["bald"]), u["hair_len"], u["hairline"], float(p["beard"]),
                     u["head_w"], u["head_h"]], _F32)
  arrays = dict(skin=skin, hair=hair, iris=iris, lips=lips, texture=texture, moles=moles,
                vector=vector)
  for arr in arrays.values():  # cached and shared: a caller's in-place edit would leak
    arr.flags.writeable = False
  return Identity(p=types.MappingProxyType(p), **arrays)
