"""Procedural faces: the embedded default data (DESIGN §4).

A deterministic renderer of 112×112 RGB faces in the ArcFace-aligned frame, each with its
exact five landmarks. Nothing here is a real person, so the whole pipeline can run (and be
tested) on a fresh machine with no face dataset.

How an image is made:

* An **identity** is a vector of shape, colour and texture factors drawn from
  `SeedSequence([seed, identity])`: head width/height/depth, skin tone and redness, eye spacing,
  height, size and tilt, iris colour, brow thickness/arch/height, nose length/width/protrusion,
  mouth height/width and lips, hair colour, greyness, hairline, volume, length and fringe,
  baldness, beard, moles, freckles, blush, ear size and a skin/hair texture map (see
  `IDENTITY_FACTORS`).
* Each **image** `(seed, identity, index)` adds nuisance: yaw (±60°), pitch (±25°), roll (±15°),
  expression (smile, open mouth, eye closure, brow raise), lighting (direction, ambient, colour,
  specular), background (gradient, texture, clutter), occlusion (glasses, sunglasses, masks,
  hands, hair across the forehead), alignment jitter, blur, noise and exposure.
* The head is an ellipsoid and the nose a smaller ellipsoid on it; every pixel is ray-cast
  (orthographic camera) onto them, so features painted in head coordinates foreshorten and hide
  correctly with pose and the Lambert/Blinn shading follows the 3-D normal. The five landmarks
  are 3-D points (eye centres, nose tip, mouth corners) projected with the same camera; the
  image is then rendered directly in the frame given by the similarity transform that maps those
  projected points onto the ArcFace template (Umeyama), exactly as aligning a detected face would.

Determinism: per-pixel work uses only IEEE-exact float32 operations (+ − × ÷ sqrt, min/max,
floor, comparisons, table look-ups); transcendental functions are evaluated on Python scalars.
So the same `(seed, identity, index)` gives the same pixels on any machine with the same numpy
random streams (PCG64 + SeedSequence, stable across numpy releases).

Layout: this module holds the per-image nuisance (`sample_nuisance`), the head geometry and
landmarks, the renderer (`render`, `render_face`) and the grain source
(`ProceduralFaceSource`). The identity factors (`IDENTITY_FACTORS`, `Identity`, `identity`)
live in `faces_identity` and the ray-casting/anti-aliasing primitives and fixed noise fields in
`faces_raster`; the identity names are re-exported here, so `faces.identity` etc. keep working.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vigface_jax.data import landmarks as lm
# Re-exported: `faces.IDENTITY_FACTORS`, `faces.Identity` and `faces.identity` stay public here.
from vigface_jax.data.faces_identity import (  # pylint: disable=unused-import
    IDENTITY_FACTORS,
    Identity,
    identity,
)
from vigface_jax.data.faces_raster import (
    _BG_FIELD,
    _F32,
    _GRID,
    _NOISE,
    _NOISE_FIELD,
    _Surface,
    _blend,
    _ellipse,
    _pixel_box,
    _quad,
    _sample,
    _unit,
)

IMAGE_SIZE = lm.IMAGE_SIZE
# Head units → aligned-frame pixels for a frontal face (template eye distance / eye spacing).
_PX_PER_UNIT = 46.0


def sample_nuisance(rng: np.random.Generator, yaw: float | None = None) -> dict[str, Any]:
  """The per-image factors: pose, expression, lighting, background, occlusion, camera."""
  # One draw of uniforms, consumed in order: 40 scalar rng calls cost more than the rest.
  it = iter(rng.random(64).tolist())
  u = it.__next__

  def tri() -> float:  # triangular in [-1, 1]: near-frontal poses are the common case
    return u() + u() - 1.0

  q = {
      "yaw": 60.0 * tri(),
      "pitch": 25.0 * tri(),
      "roll": 15.0 * tri(),
      "smile": u() ** 2,
      "mouth_open": u() * (u() < 0.3),
      "eye_open": 0.05 if u() < 0.05 else 0.45 + 0.55 * u(),
      "brow_raise": 0.05 * u(),
      "light_az": math.radians(-80 + 160 * u()),
      "light_el": math.radians(-20 + 80 * u()),
      "ambient": 0.25 + 0.35 * u(),
      "diffuse": 0.45 + 0.55 * u(),
      "specular": 0.25 * u(),
      "tint": np.array([0.1 * (u() - 0.5) for _ in range(3)], _F32),
      "bg0": np.array([u() for _ in range(3)], _F32),
      "bg1": np.array([u() for _ in range(3)], _F32),
      "bg_dir": math.radians(360 * u()),
      "bg_tex": 0.15 * u(),
      "clutter": int(4 * u()),
      "glasses": u() < 0.15,
      "sunglasses": u() < 0.05,
      "mask": u() < 0.08,
      "hand": u() < 0.08,
      "hair_across": u() < 0.08,
      "frame": np.array([0.4 * u() for _ in range(3)], _F32),
      "mask_col": np.array([0.45 + 0.5 * u() for _ in range(3)], _F32),
      "blur": int(4 * u()) if u() < 0.5 else 0,
      "noise": 0.035 * u() ** 2,
      "exposure": 0.75 + 0.5 * u(),
      "contrast": 0.8 + 0.4 * u(),
      "noise_offset": (int(_NOISE * u()), int(_NOISE * u())),
      "bg_offset": (int(_NOISE * u()), int(_NOISE * u())),
  }
  if yaw is not None:
    q["yaw"] = float(yaw)
  q["jitter"] = rng.normal(0.0, 0.8, (5, 2))
  q["clutter_shapes"] = rng.random((q["clutter"], 8)).astype(_F32)
  q["hand_shape"] = rng.random(8).astype(_F32)
  return q


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """Head → camera rotation `Rz(roll) @ Rx(pitch) @ Ry(yaw)` (x right, y down, z to camera)."""
  y, p, r = math.radians(yaw), math.radians(pitch), math.radians(roll)
  ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
  rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
  rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
  return rz @ rx @ ry


def _surface_z(p: dict[str, Any], hx: float, hy: float) -> float:
  """Head-space z of the frontal head surface at (hx, hy)."""
  s = 1.0 - (hx / p["head_w"]) ** 2 - (hy / p["head_h"]) ** 2
  return p["head_d"] * math.sqrt(max(s, 0.0))


def _nose_geometry(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Centre and semi-axes (head space) of the nose ellipsoid."""
  # Tip at about half-way from the eye line to the mouth line, as in the ArcFace template.
  ny = p["eye_y"] + 0.5 * p["nose_len"] + 0.145
  centre = np.array([0.0, ny, _surface_z(p, 0.0, ny) - 0.35 * p["nose_protrude"]])
  axes = np.array([p["nose_w"], 0.5 * p["nose_len"] + 0.06, 1.35 * p["nose_protrude"]])
  return centre, axes


def _mouth_corners(p: dict[str, Any], q: dict[str, Any]) -> tuple[float, float]:
  # mouth_w is the half-width: mouth width ≈ 0.83 × eye distance, the template's ratio.
  half_w = p["mouth_w"] * (1.0 + 0.12 * q["smile"] - 0.1 * q["mouth_open"])
  return half_w, p["mouth_y"] - 0.05 * q["smile"]


def landmarks_3d(ident: Identity, q: dict[str, Any]) -> np.ndarray:
  """The five ArcFace-order landmarks in head space, float64 [5, 3]."""
  p = ident.p
  cx, cy = _nose_geometry(p)
  tip = cx + np.array([0.0, 0.25 * cy[1], cy[2]])
  mw, my = _mouth_corners(p, q)
  pts = [(-p["eye_dx"], p["eye_y"]), (p["eye_dx"], p["eye_y"]), None, (-mw, my), (mw, my)]
  out = np.zeros((5, 3))
  for i, xy in enumerate(pts):
    if xy is None:
      out[i] = tip
    else:
      out[i] = (xy[0], xy[1], _surface_z(p, *xy))
  return out


def render(ident: Identity, q: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Renders one face.

  Args:
    ident: identity factors (`identity(seed, id)`).
    q: nuisance factors (`sample_nuisance`).

  Returns:
    (image uint8 [112, 112, 3] RGB, landmarks float32 [5, 2]) in the aligned frame.
  """
  p = ident.p
  size = IMAGE_SIZE
  rot = _rotation(q["yaw"], q["pitch"], q["roll"])
  pts3 = landmarks_3d(ident, q)
  proj = (pts3 @ rot.T)[:, :2]
  target = lm.ARCFACE_TEMPLATE.astype(np.float64) + q["jitter"]
  m = lm.estimate_similarity(proj, target)
  points = lm.apply_affine(m, proj).astype(_F32)
  scale = math.hypot(m[0, 0], m[1, 0])
  # Inverse similarity: aligned pixel (x, y) → camera (u, v).
  det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
  a_inv = np.array([[m[1, 1], -m[0, 1]], [-m[1, 0], m[0, 0]]]) / det
  b_inv = -a_inv @ m[:, 2]
  gy, gx = _GRID
  u = gx * _F32(a_inv[0, 0]) + gy * _F32(a_inv[0, 1]) + _F32(b_inv[0])
  v = gx * _F32(a_inv[1, 0]) + gy * _F32(a_inv[1, 1]) + _F32(b_inv[1])
  sharp = scale  # 1 head unit = `scale` pixels: edges one pixel wide

  # Background: gradient, texture, clutter.
  d = math.cos(q["bg_dir"]) * (gx - 56) + math.sin(q["bg_dir"]) * (gy - 56)
  t = _unit(d * _F32(1 / 112) + _F32(0.5))
  canvas = q["bg0"][:, None, None] + t * (q["bg1"] - q["bg0"])[:, None, None]
  oy, ox = q["bg_offset"]
  canvas += _BG_FIELD[oy:oy + size, ox:ox + size] * q["bg_tex"]
  for sh in q["clutter_shapes"]:
    cx, cy, rx, ry = 112 * float(sh[0]), 112 * float(sh[1]), 8 + 40 * sh[2], 8 + 40 * sh[3]
    rad = max(rx, ry) + 2
    b = (slice(max(int(cy - rad), 0), int(cy + rad) + 1),
         slice(max(int(cx - rad), 0), int(cx + rad) + 1))
    alpha = _ellipse(gx[b], gy[b], cx, cy, rx, ry, 1.0, rot=float(sh[4]) * 3.0)
    _blend(canvas[:, b[0], b[1]], alpha * _F32(0.5 + 0.5 * sh[5]), sh[5:8])

  surf = _Surface(u, v, rot, scale)
  light = np.array([math.sin(q["light_az"]) * math.cos(q["light_el"]),
                    -math.sin(q["light_el"]),
                    math.cos(q["light_az"]) * math.cos(q["light_el"])])
  light_h = rot.T @ light  # light direction in head space
  half = light + np.array([0.0, 0.0, 1.0])
  half_h = rot.T @ (half / np.linalg.norm(half))
  hair_tex_scale = 24.0

  def shade(normal, albedo, spec):
    inv_n = _F32(1) / np.sqrt(normal[0] ** 2 + normal[1] ** 2 + normal[2] ** 2 + _F32(1e-12))
    ndl = (normal[0] * _F32(light_h[0]) + normal[1] * _F32(light_h[1])
           + normal[2] * _F32(light_h[2])) * inv_n
    ndh = (normal[0] * _F32(half_h[0]) + normal[1] * _F32(half_h[1])
           + normal[2] * _F32(half_h[2])) * inv_n
    ndh = np.maximum(ndh, 0)
    for _ in range(4):  # ndh ** 16 without pow
      ndh = ndh * ndh
    lit = _F32(q["ambient"]) + _F32(q["diffuse"]) * np.maximum(ndl, 0)
    return albedo * lit * (_F32(1) + q["tint"])[:, None, None] + ndh * spec

  # Hair volume behind the head (long hair, back of the head).
  if not p["bald"]:
    vol = p["hair_volume"]
    cover, _, hh, hn = surf.cast((0.0, -0.08, -0.1),
                                 (p["head_w"] + vol, p["head_h"] + 0.6 * vol, p["head_d"] + vol))
    cover = cover * _unit((p["hair_len"] - hh[1]) * sharp)
    rows = np.flatnonzero(cover.any(axis=1))  # short hair: shade only the rows it covers
    if rows.size:
      r = slice(int(rows[0]), int(rows[-1]) + 1)
      tex = _sample(ident.texture, hh[0][r], hh[1][r] * 0.15, hair_tex_scale)
      albedo = ident.hair[:, None, None] * (1 + 0.25 * tex)
      _blend(canvas[:, r], cover[r],
             shade([n[r] for n in hn], albedo, _F32(0.3 * q["specular"])))

  # Ears and neck, behind the head's silhouette.
  for side in (-1.0, 1.0):
    ear = np.array([side * p["head_w"] * 0.98, p["eye_y"] + 0.12, -0.05])
    ec = rot @ ear
    b = _pixel_box(*(m[:, :2] @ ec[:2] + m[:, 2]), p["ear_size"] * scale + 3)
    if b is not None:
      alpha = _ellipse(u[b], v[b], ec[0], ec[1],
                       0.5 * p["ear_size"] * (0.4 + 0.6 * abs(rot[2, 0])), p["ear_size"], sharp,
                       rot=math.radians(q["roll"]))
      _blend(canvas[:, b[0], b[1]], alpha,
             ident.skin * _F32(0.9 * (q["ambient"] + 0.5 * q["diffuse"])))
  neck = rot @ np.array([0.0, p["head_h"] * 0.9, -0.2]) + np.array([0.0, 0.4, 0.0])
  b = _pixel_box(*(m[:, :2] @ neck[:2] + m[:, 2]), 0.9 * scale + 3)
  if b is not None:
    alpha = _ellipse(u[b], v[b], neck[0], neck[1], p["head_w"] * 0.62, 0.9, sharp)
    _blend(canvas[:, b[0], b[1]], alpha, ident.skin * _F32(0.55 + 0.3 * q["ambient"]))

  # Head and nose: a single head-space surface where the nose is in front of the head.
  cover, z, hpt, hnorm = surf.cast((0.0, 0.0, 0.0), (p["head_w"], p["head_h"], p["head_d"]))
  ncent, naxes = _nose_geometry(p)
  hx, hy, hz = hpt
  normal = hnorm
  nx, ny = m[:, :2] @ (rot @ ncent)[:2] + m[:, 2]
  b = _pixel_box(nx, ny, float(naxes.max()) * scale + 3)
  if b is not None:
    ncover, nz, npt, nnorm = surf.cast(ncent, naxes, b)
    # The nose ellipsoid is cut where it would stick out of the back of the cheeks.
    nose = (ncover > 0) & (nz > z[b]) & (npt[2] > _F32(ncent[2]))
    for dst, src in zip((hx, hy, hz, *normal), (*npt, *nnorm)):
      dst[b] = np.where(nose, src, dst[b])
    cover[b] = np.maximum(cover[b], np.where(nose, ncover, 0))
  face = _unit(hz * _F32(4.0) + _F32(0.5))  # front half of the head

  def box(cx, cy, radius, lift=0.12):
    """Pixel slices holding the head-space disc (cx, cy, radius); `lift` pads for relief."""
    pt = rot @ np.array([cx, cy, _surface_z(p, cx, cy)])
    x, y = m[:, :2] @ pt[:2] + m[:, 2]
    return _pixel_box(x, y, (radius + lift) * scale + 2)

  def paint(b, colour, make_alpha):
    """Blends `colour` into albedo over box `b` with alpha `make_alpha(hx, hy)` × face."""
    if b is not None:
      _blend(albedo[:, b[0], b[1]], make_alpha(hx[b], hy[b]) * face[b], colour)

  tex = _sample(ident.texture, hx, hy, 14.0)
  albedo = ident.skin[:, None, None] * (_F32(1) + _F32(0.05) * tex)
  if p["freckles"] > 0:
    fr = _unit(_sample(ident.texture, hx, hy, 55.0) - _F32(1.2)) * _F32(p["freckles"])
    _blend(albedo, fr * face, ident.skin * _F32(0.6))
  by = p["mouth_y"] - 0.28  # blush on both cheeks at once: an ellipse in (|hx|, hy)
  paint(box(0.0, by, 0.72, lift=0.04), np.array([0.85, 0.35, 0.35], _F32),
        lambda x, y: _ellipse(np.abs(x), y, 0.5, by, 0.22, 0.15, 8.0) * (p["blush"] * 6))
  for mx, my, mr in ident.moles:
    paint(box(mx, my, mr), ident.skin * _F32(0.35),
          lambda x, y: _ellipse(x, y, mx, my, mr, mr, sharp))
  if p["beard"]:
    beard = _unit((hy - _F32(p["mouth_y"] - p["beard_top"] * 0.6)) * _F32(10))
    beard = beard * _unit(_sample(ident.texture, hx * 3, hy * 3, 30.0) + _F32(1.2))
    _blend(albedo, beard * _F32(p["beard_density"]) * face, ident.hair * _F32(0.8))

  # Eye sockets, eyes and brows, in one box per eye and the eye's tilted frame (dx, dy).
  eye_open = q["eye_open"]
  rx, ry = p["eye_rx"], max(p["eye_ry"] * eye_open, 1e-3)
  ir = p["iris_r"] * rx
  brow_dy = p["brow_arch"] - p["brow_gap"] - q["brow_raise"]  # brow-arc centre below the eye
  brow_ry = p["brow_arch"] + 0.08
  for side in (-1.0, 1.0):
    ex, ey = side * p["eye_dx"], p["eye_y"]
    b = box(ex, ey - 0.5 * p["brow_gap"],
            max(1.6 * rx, p["brow_gap"] + 0.1, 2.6 * p["eye_ry"] + 0.5 * p["brow_gap"]),
            lift=0.04)
    if b is None:
      continue
    fb, alb = face[b], albedo[:, b[0], b[1]]
    c, s = math.cos(side * p["eye_tilt"]), math.sin(side * p["eye_tilt"])
    ox, oy = hx[b] - ex, hy[b] - ey
    dx, dy = ox * c - oy * s, oy * c + ox * s
    dx2, dy2 = dx * dx, dy * dy
    r2 = dx2 + dy2
    _blend(alb, _quad(dx2, dy2, 1.6 * rx, 2.6 * p["eye_ry"], 6.0) * fb * 0.25,
           ident.skin * _F32(0.6))
    white = _quad(dx2, dy2, rx, ry, sharp) * fb
    _blend(alb, white, np.array([0.93, 0.92, 0.9], _F32))
    _blend(alb, _quad(r2, r2, ir * math.sqrt(2), ir * math.sqrt(2), sharp) * white, ident.iris)
    _blend(alb, _quad(r2, r2, 0.57 * ir, 0.57 * ir, sharp) * white, np.zeros(3, _F32))
    rim = _quad(dx2, dy2, rx * 1.05, max(ry, 0.004) + 0.006, sharp * 0.7)
    lid = _unit(1.4 - np.abs(rim - 0.5) * 2.8)
    _blend(alb, lid * fb * 0.8, np.array([0.1, 0.07, 0.06], _F32))
    by = dy - brow_dy
    brow = (_quad(dx2, by * by, rx * 1.5, brow_ry, sharp * 0.5)
            - _quad(dx2, (by - p["brow_thick"]) ** 2, rx * 1.5, brow_ry, sharp * 0.5))
    brow = _unit(brow) * _unit(by * -20)
    _blend(alb, brow * fb * p["brow_dark"], ident.hair * _F32(0.6))

  # Nostrils and mouth.
  tip_y = ncent[1] + 0.25 * naxes[1]
  nx = 0.55 * p["nose_w"]
  paint(box(0.0, tip_y + 0.045, nx + 2 * p["nostril"], lift=p["nose_protrude"] + 0.15),
        ident.skin * _F32(0.25),
        lambda x, y: np.maximum(
            *(_ellipse(x, y, side * nx, tip_y + 0.045, p["nostril"] * 1.5, p["nostril"], sharp)
              for side in (-1.0, 1.0))) * 0.8)
  mw, my = _mouth_corners(p, q)
  b = box(0.0, my, mw + 0.06, lift=0.04)
  if b is not None:
    x, y, fb, alb = hx[b], hy[b], face[b], albedo[:, b[0], b[1]]
    openy = 0.07 * q["mouth_open"]
    smile = _F32(q["smile"] * 0.05)
    curve = (x / _F32(mw)) ** 2
    upper = _ellipse(x, y - smile * (_F32(1) - curve), 0.0, my - openy / 2, mw,
                     p["lip_thick"] * 0.8, sharp) * fb
    lower = _ellipse(x, y + smile * curve, 0.0, my + openy / 2 + 0.01, mw * 0.9,
                     p["lip_thick"], sharp) * fb
    _blend(alb, upper, ident.lips * _F32(0.92))
    _blend(alb, lower, ident.lips)
    if openy > 0:
      _blend(alb, _ellipse(x, y, 0.0, my + 0.005, mw * 0.8, openy * 0.6 + 1e-3, sharp) * fb,
             np.array([0.2, 0.05, 0.05], _F32))
    _blend(alb, _ellipse(x, y, 0.0, my + 0.002, mw, 0.006 + openy * 0.1, sharp) * fb,
           ident.lips * _F32(0.4))
  # Scalp hair on the head surface.
  hair_alpha = np.zeros_like(hx)
  if not p["bald"]:
    line = _F32(p["hairline"]) + _F32(p["hairline_curve"]) * hx * hx
    hair_alpha = _unit((line - hy) * _F32(sharp * 0.6))
    hair_alpha = np.maximum(hair_alpha, _unit((_F32(-0.15) - hz) * _F32(6)))
    side = _unit((np.abs(hx) - _F32(0.82 * p["head_w"])) * _F32(25))
    hair_alpha = np.maximum(hair_alpha, side * _unit((_F32(p["eye_y"] + 0.1) - hy) * 20))
    if p["fringe"] or q["hair_across"]:
      fy = p["fringe_y"] if p["fringe"] else p["eye_y"] - 0.05
      wave = _F32(0.06) * _sample(ident.texture, hx, hx * _F32(0.1), 10.0)
      hair_alpha = np.maximum(hair_alpha, np.clip((_F32(fy) + wave - hy) * _F32(sharp * 0.5),
                                                  0, 1))
    rows = np.flatnonzero(hair_alpha.any(axis=1))  # hair covers few rows of most faces
    if rows.size:
      r = slice(int(rows[0]), int(rows[-1]) + 1)
      hair_alb = ident.hair[:, None, None] * (
          1 + 0.25 * _sample(ident.texture, hx[r], hy[r] * 0.15, hair_tex_scale))
      _blend(albedo[:, r], hair_alpha[r], hair_alb)

  # Occluders painted on the head surface.
  if q["mask"]:
    mask = _unit((hy - _F32(ncent[1] - 0.05)) * _F32(sharp))
    mask = mask * _unit((_F32(p["head_w"] * 0.88) - np.abs(hx)) * _F32(sharp))
    _blend(albedo, mask * _unit(hz * _F32(8)), q["mask_col"])
  if q["glasses"] or q["sunglasses"]:
    for side in (-1.0, 1.0):
      ex = side * p["eye_dx"]
      outer = _ellipse(hx, hy, ex, p["eye_y"] + 0.01, p["eye_rx"] * 1.9, 0.16, sharp)
      inner = _ellipse(hx, hy, ex, p["eye_y"] + 0.01, p["eye_rx"] * 1.9 - 0.025, 0.135, sharp)
      ring = _unit(outer - inner)
      if q["sunglasses"]:
        ring = outer
      _blend(albedo, ring * _unit(hz * _F32(8)), q["frame"])
    bridge = _unit((_F32(0.03) - np.abs(hy - _F32(p["eye_y"] - 0.05))) * _F32(sharp))
    bridge = bridge * _unit((_F32(p["eye_dx"] - p["eye_rx"]) - np.abs(hx)) * _F32(sharp))
    _blend(albedo, bridge, q["frame"])
    arm = _unit((_F32(0.022) - np.abs(hy - _F32(p["eye_y"] - 0.06))) * _F32(sharp))
    arm = arm * _unit((np.abs(hx) - _F32(p["eye_dx"] + 1.7 * p["eye_rx"])) * _F32(sharp))
    _blend(albedo, arm, q["frame"])

  spec = _F32(q["specular"]) * (_F32(1) - hair_alpha * _F32(0.7))
  face_rgb = shade(normal, albedo, spec)
  _blend(canvas, cover, face_rgb)

  # A hand in front of the face (from below or the side), in image space.
  if q["hand"]:
    hs = q["hand_shape"]
    cx, cy = 20 + 72 * float(hs[0]), 70 + 30 * float(hs[1])
    ang = -0.8 + 1.6 * float(hs[2])
    hand_col = ident.skin * _F32(0.7 + 0.4 * float(hs[3]))
    alpha = _ellipse(gx, gy, cx, cy + 20, 24, 30, 1.0, rot=ang)
    for f in range(4):
      off = (f - 1.5) * 9.0
      fx = cx + off * math.cos(ang) + 14 * math.sin(ang)
      fy = cy + off * math.sin(ang) - 14 * math.cos(ang)
      alpha = np.maximum(alpha, _ellipse(gx, gy, fx, fy, 4.5, 15 + 3 * float(hs[4 + f]), 1.0,
                                         rot=ang))
    shade_y = _F32(0.6) + _F32(0.4) * _unit(gy * _F32(1 / 112))
    _blend(canvas, alpha, hand_col[:, None, None] * shade_y)

  # Camera: blur, exposure/contrast, noise.
  for _ in range(q["blur"]):
    canvas[:, 1:-1] = (canvas[:, :-2] + 2 * canvas[:, 1:-1] + canvas[:, 2:]) * _F32(0.25)
    canvas[:, :, 1:-1] = (canvas[:, :, :-2] + 2 * canvas[:, :, 1:-1] + canvas[:, :, 2:]) * _F32(
        0.25)
  oy, ox = q["noise_offset"]
  noise = _NOISE_FIELD[:, oy:oy + size, ox:ox + size]
  # 255·(((x − ½)·contrast + ½)·exposure + noise) + ½, clipped: the uint8 cast truncates, so
  # this rounds half up. Written straight into an HWC buffer through its CHW view.
  gain = 255 * q["contrast"] * q["exposure"]
  canvas *= gain
  canvas += noise * (255 * q["noise"]) + (127.5 * (1 - q["contrast"]) * q["exposure"] + 0.5)
  np.clip(canvas, 0, 255.49, out=canvas)
  image = np.empty((size, size, 3), np.uint8)
  np.copyto(image.transpose(2, 0, 1), canvas, casting="unsafe")
  return image, points


def nuisance(seed: int, identity_id: int, index: int,
             yaw: float | None = None) -> dict[str, Any]:
  """The nuisance factors of image `index` of identity `identity_id` under `seed`."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(identity_id), int(index),
                                                      104729]))
  return sample_nuisance(rng, yaw=yaw)


def render_face(seed: int, identity_id: int, index: int,
                yaw: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Image `index` of identity `identity_id` under `seed` (optionally forcing the yaw)."""
  return render(identity(seed, identity_id), nuisance(seed, identity_id, index, yaw=yaw))


class ProceduralFaceSource:
  """A grain random-access source of procedural faces in the shared element spec.

  Record `i` is image `i % images_per_identity` of identity `identity_offset + i //
  images_per_identity`; its label is `i // images_per_identity`. Held-out (evaluation)
  identities use a large `identity_offset` so they never meet training identities.
  """

  def __init__(self, seed: int = 0, num_identities: int = 1000, images_per_identity: int = 64,
               identity_offset: int = 0, cache: bool = False):
    for name, val in (("num_identities", num_identities),
                      ("images_per_identity", images_per_identity)):
      if int(val) <= 0:
        raise ValueError(f"ProceduralFaceSource: {name} must be positive, got {val}")
    self.seed = int(seed)
    self.num_identities = int(num_identities)
    self.images_per_identity = int(images_per_identity)
    self.identity_offset = int(identity_offset)
    # cache=True keeps every rendered record (~38 kB each) in this process: a small dataset
    # trained for many epochs then renders each face once (the CPU demo).
    self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None

  @property
  def num_classes(self) -> int:
    return self.num_identities

  def __len__(self) -> int:
    return self.num_identities * self.images_per_identity

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    i = int(record_key)
    if not 0 <= i < len(self):
      raise IndexError(f"ProceduralFaceSource: record {i} outside [0, {len(self)})")
    if self._cache is not None and i in self._cache:
      return dict(self._cache[i])
    label, index = divmod(i, self.images_per_identity)
    image, points = render_face(self.seed, self.identity_offset + label, index)
    record = {"image": image, "label": np.int32(label), "landmarks": points,
              "has_landmarks": np.bool_(True)}
    if self._cache is not None:
      self._cache[i] = record
      return dict(record)
    return record

  def __repr__(self) -> str:
    return (f"ProceduralFaceSource(seed={self.seed}, num_identities={self.num_identities}, "
            f"images_per_identity={self.images_per_identity}, "
            f"identity_offset={self.identity_offset})")
