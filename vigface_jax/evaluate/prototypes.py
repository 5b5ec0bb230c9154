"""The stage-1 prototype report: how far virtual class centres are from real ones (DESIGN §1).

VIGFace's privacy claim is that the `k` virtual rows of `W = [W_R; W_V]` end up far from every
real row. This module measures it at the end of stage-1 training:

* `separability`: cosine statistics over all distinct pairs of the three groups virtual↔real,
  virtual↔virtual and real↔real (max, mean, percentiles), each row's nearest other row, and the
  verdict of the privacy criterion
  `p99(nearest-real cosine of virtual rows) < median(nearest-other-real cosine of real rows)`.
* `similarity_figure`: the cosine-similarity matrix over a sample of rows, real rows first then
  virtual ones (the paper's Figure 3).
* `write_report`: both of the above plus the normalised prototypes, into the workdir.

Layout: `centres` is `[embed_dim, num_classes]` by default, exactly as `models.margin.ClassCentres`
stores its `weight` (classes are columns); pass `class_axis=0` for `[num_classes, embed_dim]`.
Classes `[0, num_real)` are real, `[num_real, num_classes)` virtual.

Numerics and cost: rows are L2-normalised in float32 and the `[C, C]` cosine matrix is never
built; rows are processed `block` at a time against all `C` rows (float32 matmul), so peak extra
memory is about `3 * block * C * 4` bytes (≈6 GB for block=4096, C=130K; lower `block` on small
hosts) and time is dominated by the `C^2 / 2` histogram updates (C=8000, d=512: ~1.7 s on
2 CPU cores, so several minutes at C=130K). Max, mean (float64
accumulation) and nearest neighbours are exact. Percentiles of the pair groups come from a
fixed histogram of `HIST_BINS` = 20001 equal bins over [-1, 1] (width 2/20001 ≈ 1e-4; order
statistics are placed at bin centres and linearly interpolated as `np.percentile` does, so
they are within one bin width of the exact value). Percentiles of the per-row nearest-neighbour
cosines (and so the verdict) are exact. Cosines are clipped to [-1, 1] (float32 rounding can
exceed 1 for duplicate rows). Pair statistics of a group with no pairs are None.

Above `DEVICE_ABOVE` rows (WebFace-scale heads of millions of classes) the host scan would take
days: the nearest neighbours of every row then come from `generate.search`'s exact sharded
search (the rows split over the devices, float32-rescored), so the verdict stays exact, and
the pair statistics from all pairs among `PAIR_SAMPLE` uniformly drawn rows (`pairs_from` in
the report). A head sharded across processes reaches process 0's host in blocks of classes
(`parallel.fetch_in_blocks`); no device ever holds the whole matrix.

Typical use, at the end of stage-1 training:

  report = prototypes.write_report(workdir, state.head.weight, config.num_real)
  report["verdict"]["passed"]
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np

from vigface_jax import metrics
from vigface_jax import parallel

HIST_BINS = 20001
PERCENTILES = (50, 90, 99, 99.9)
_NEAREST_PERCENTILES = (50, 99)


def _rows(centres: Any, class_axis: int) -> np.ndarray:
  """L2-normalised float32 `[num_classes, embed_dim]` rows (zero rows stay zero)."""
  x = np.asarray(centres, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"centres must be 2-D, got shape {x.shape}")
  if class_axis not in (0, 1, -1, -2):
    raise ValueError(f"class_axis must be 0 or 1, got {class_axis}")
  if class_axis in (1, -1):
    x = x.T
  norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1, keepdims=True))
  return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


class _PairGroup:
  """Running count, max, float64 sum and histogram of the cosines of one group of pairs."""

  def __init__(self):
    self.count = 0
    self.total = 0.0
    self.max = -np.inf
    self.hist = np.zeros(HIST_BINS, np.int64)

  def add(self, cos: np.ndarray) -> None:
    """Adds every entry of `cos` (any shape) as one pair."""
    if cos.size == 0:
      return
    self.hist += np.bincount(_bin(cos).ravel(), minlength=HIST_BINS)
    self.count += cos.size
    self.total += float(cos.sum(dtype=np.float64))
    self.max = max(self.max, float(cos.max()))

  def add_within(self, sim: np.ndarray, first: int, last: int) -> None:
    """Adds the pairs (i, j), first <= i < j < last, from `sim [last - first, C]` (rows i).

    Together with adding each block's columns after `last`, this counts every unordered pair
    of a group once: a percentile over ordered pairs (each value twice) would interpolate
    between different order statistics.
    """
    square = sim[:, first:last]
    self.add(square[np.triu_indices(last - first, 1)])

  def stats(self) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": self.count}
    if self.count == 0:
      out.update(max=None, mean=None, **{_pname(q): None for q in PERCENTILES})
      return out
    out["max"] = self.max
    out["mean"] = self.total / self.count
    for q in PERCENTILES:
      out[_pname(q)] = _hist_percentile(self.hist, q)
    return out


def _bin(cos: np.ndarray) -> np.ndarray:
  """Histogram bin of each cosine (already clipped to [-1, 1])."""
  idx = ((cos + np.float32(1.0)) * np.float32(HIST_BINS / 2.0)).astype(np.int32)
  return np.minimum(idx, HIST_BINS - 1, out=idx)


def _hist_percentile(hist: np.ndarray, q: float) -> float:
  """`np.percentile(values, q)` (linear) with each value replaced by its bin centre."""
  total = int(hist.sum())
  rank = q / 100.0 * (total - 1)
  lo, hi = int(np.floor(rank)), int(np.ceil(rank))
  cdf = np.cumsum(hist)
  # Order statistic r lives in the first bin whose cumulative count exceeds r.
  b_lo, b_hi = np.searchsorted(cdf, [lo, hi], side="right")
  width = 2.0 / HIST_BINS
  v_lo, v_hi = -1.0 + (b_lo + 0.5) * width, -1.0 + (b_hi + 0.5) * width
  return float(v_lo + (rank - lo) * (v_hi - v_lo))


def _pname(q: float) -> str:
  return f"p{q:g}".replace(".", "_")


def _summary(values: np.ndarray, percentiles=_NEAREST_PERCENTILES) -> dict[str, Any]:
  """Exact max/mean/percentiles of per-row nearest-neighbour cosines."""
  values = values[np.isfinite(values)]
  out: dict[str, Any] = {"rows": int(values.size)}
  if values.size == 0:
    out.update(max=None, mean=None, **{_pname(q): None for q in percentiles})
    return out
  out["max"] = float(values.max())
  out["mean"] = float(values.mean(dtype=np.float64))
  for q in percentiles:
    out[_pname(q)] = float(np.percentile(values.astype(np.float64), q))
  return out


# Above this many rows the nearest-neighbour search runs on the devices, sharded, and the pair
# statistics come from a sample of rows (a host scan of all C^2 / 2 pairs is days at 2M rows).
DEVICE_ABOVE = 262_144
PAIR_SAMPLE = 32_768  # rows whose pairs give the pair statistics above DEVICE_ABOVE


def separability(centres: Any, num_real: int, *, block: int = 4096,
                 class_axis: int = 1, device_above: int = DEVICE_ABOVE,
                 pair_sample: int = PAIR_SAMPLE, seed: int = 0,
                 mesh: Any = None) -> dict[str, Any]:
  """Cosine separation of virtual and real class centres.

  Up to `device_above` rows everything is computed on the host, exactly (module docstring).
  Above it (WebFace-scale heads: 2M rows), the nearest neighbours of every row, and so the
  verdict, come from the exact sharded search of `generate.search` (the rows split over the
  devices of `mesh`, never whole on one device; float32 rescoring makes the returned cosines
  exact), and the pair statistics from all pairs among `pair_sample` rows drawn uniformly
  (`pairs_from` says how many, of how many, with which seed).

  Args:
    centres: `[embed_dim, num_classes]` (the margin head's `weight`; `class_axis=1`) or
      `[num_classes, embed_dim]` (`class_axis=0`); any float dtype, numpy or addressable jax.
    num_real: `n`; classes `[0, n)` are real, the remaining `k` virtual (k may be 0).
    block: rows per matmul block; memory is O(block * num_classes).
    class_axis: which axis of `centres` indexes classes.
    device_above, pair_sample, seed: the large-head path (above), its sample and seed.
    mesh: devices for the large-head search (default: this process's devices).

  Returns:
    A dict (JSON-ready except `per_row`):
      `num_real`, `num_virtual`, `embed_dim`, `hist_bins`, `pairs_from`;
      `virtual_real`, `virtual_virtual`, `real_real`: `{pairs, max, mean, p50, p90, p99, p99_9}`
        over distinct pairs (percentiles from the histogram, see the module docstring);
      `nearest_real_to_virtual`: `{rows, max, mean, p50, p99}` of each virtual row's max cosine
        to any real row; `nearest_real_to_real`: the same for each real row to another real row;
      `verdict`: `{passed, virtual_nearest_real_p99, real_nearest_real_median, criterion}`
        (`passed` None when k = 0 or n < 2, with `reason`);
      `per_row`: numpy arrays over all `C` rows — `nearest_real_index` / `nearest_real_cosine`
        (nearest real row other than itself; -1 / NaN when none) and `nearest_index` /
        `nearest_cosine` (nearest other row of either kind).
  """
  x = _rows(centres, class_axis)
  num_classes, dim = x.shape
  n = int(num_real)
  if not 0 <= n <= num_classes:
    raise ValueError(f"num_real={n} outside [0, {num_classes}]")
  k = num_classes - n
  block = max(1, int(block))
  if num_classes > int(device_above):
    take = np.sort(np.random.default_rng(seed).choice(
        num_classes, min(int(pair_sample), num_classes), replace=False))
    groups, _ = _scan(x[take], int(np.sum(take < n)), block, nearest=False)
    per_row = _nearest_on_devices(x, n, mesh)
    pairs_from = {"rows": int(take.size), "of": num_classes, "seed": int(seed),
                  "nearest": "every row, sharded device search"}
  else:
    groups, per_row = _scan(x, n, block, nearest=True)
    pairs_from = {"rows": num_classes, "of": num_classes, "nearest": "every row, host"}
  near_real_cos = per_row["nearest_real_cosine"]
  result: dict[str, Any] = {
      "num_real": n, "num_virtual": k, "embed_dim": dim, "hist_bins": HIST_BINS,
      "pairs_from": pairs_from,
      **{name: g.stats() for name, g in groups.items()},
      "nearest_real_to_virtual": _summary(near_real_cos[n:]),
      "nearest_real_to_real": _summary(near_real_cos[:n]),
  }
  result["real_span"] = real_span(x, n, block=block)
  result["verdict"] = _verdict(result)
  result["per_row"] = per_row
  return result


def real_directions(x: np.ndarray, num_real: int, *, block: int = 4096
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The real rows' principal directions (uncentred second moment `[d, d]`, accumulated
  `block` rows at a time): `(cumulative energy share [d], directions [d, d] as columns)`,
  largest first. Rows `[0, num_real)` of `x` are the real ones."""
  x = np.asarray(x)
  dim = x.shape[1]
  moment = np.zeros((dim, dim), np.float64)
  for i in range(0, int(num_real), block):
    r = x[i:min(i + block, int(num_real))].astype(np.float64)
    moment += r.T @ r
  values, vectors = np.linalg.eigh(moment)
  values, vectors = values[::-1].clip(min=0), vectors[:, ::-1]
  return np.cumsum(values) / max(values.sum(), 1e-30), vectors


def _directions_holding(cumulative: np.ndarray, energy: float) -> int:
  """How many of the largest principal directions hold `energy` of the energy, given
  `real_directions`' cumulative shares."""
  return int(min(np.searchsorted(cumulative, float(energy) - 1e-12) + 1, len(cumulative)))


def real_span(x: np.ndarray, num_real: int, *, block: int = 4096,
              energies: tuple[float, ...] = (0.9, 0.99)) -> dict[str, Any]:
  """How much of the row space the real rows fill, and how much of it the virtual rows use.

  The stage-2 DiT sees a row through a linear projection trained on real rows only: in a
  direction where real rows have no energy its weights never receive a gradient, so the part
  of a virtual row lying there reaches the generator through untrained weights. From
  `real_directions`: the number of principal directions holding each fraction of `energies`
  of the real rows' energy, and the mean fraction of a virtual row's energy inside the
  directions holding the largest of them (rows are unit vectors; 1 = virtual rows live where
  real rows do). `benchmarks/row_span.py` measures the same share for faces' features.
  """
  x = np.asarray(x)
  n, dim = int(num_real), x.shape[1]
  out: dict[str, Any] = {"embed_dim": dim, "energies": list(energies)}
  if n == 0:
    return out
  cumulative, vectors = real_directions(x, n, block=block)
  dims = [_directions_holding(cumulative, q) for q in energies]
  out["real_dims"] = dims
  if x.shape[0] > n:
    basis = vectors[:, :dims[-1]]
    inside = [np.sum(np.square(x[i:i + block].astype(np.float64) @ basis), axis=1)
              for i in range(n, x.shape[0], block)]
    out["virtual_energy_inside"] = float(np.mean(np.concatenate(inside)))
  return out


def project_to_real_span(virtual: np.ndarray, real: np.ndarray, energy: float, *,
                         block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """`virtual` rows `[k, d]` projected onto the real rows' principal directions holding
  `energy` of their energy (`real_directions`), renormalised: `(rows [k, d], the directions
  [d, m] as orthonormal columns)`.

  Stage 1 moves a virtual row only through the ArcFace logits `f · v` of real faces' features
  `f`, and features stay inside the real rows' span (`benchmarks/row_span.py`), so a virtual
  row's part outside that span is its random initialisation, never trained; the stage-2 DiT's
  row projection never received a gradient there either. This keeps the trained part.

  Raises:
    ValueError: `energy` outside (0, 1], or a row with no energy inside the span.
  """
  if not 0.0 < float(energy) <= 1.0:
    raise ValueError(f"energy={energy} must be in (0, 1]")
  real = np.asarray(real, np.float32)
  cumulative, vectors = real_directions(real, real.shape[0], block=block)
  dims = _directions_holding(cumulative, energy)
  basis = vectors[:, :dims]
  out = (np.asarray(virtual, np.float64) @ basis) @ basis.T
  norms = np.linalg.norm(out, axis=1, keepdims=True)
  if np.any(norms < 1e-6):
    bad = int(np.flatnonzero(norms[:, 0] < 1e-6)[0])
    raise ValueError(f"virtual row {bad} has no energy inside the real rows' {dims} principal "
                     "directions: it cannot be projected")
  return (out / norms).astype(np.float32), basis


def shape_like_real(rows: np.ndarray, real: np.ndarray, basis: np.ndarray) -> np.ndarray:
  """Unit `rows` `[k, d]` inside `basis`'s span `[d, m]` with each coordinate along a basis
  direction scaled by the real rows' root-mean-square coordinate there (relative to their mean
  over the directions), renormalised.

  A row projected from an isotropic initialisation spreads its energy evenly over the span's
  directions, while real rows put most of theirs in the first few (the demo's: 9% in the first
  of 35, 60% in the first ten, against 2.6% and 27% for projected virtual rows). This gives
  the rows the real rows' energy profile, so a virtual identity differs from the others along
  the directions real identities differ most along.
  """
  basis = np.asarray(basis, np.float64)
  coords = np.asarray(rows, np.float64) @ basis
  rms = np.sqrt(np.mean(np.square(np.asarray(real, np.float64) @ basis), axis=0))
  out = (coords * (rms / np.sqrt(np.mean(np.square(rms))))) @ basis.T
  norms = np.linalg.norm(out, axis=1, keepdims=True)
  if np.any(norms < 1e-9):
    raise ValueError(f"row {int(np.flatnonzero(norms[:, 0] < 1e-9)[0])} has no energy along "
                     "the directions the real rows use")
  return (out / norms).astype(np.float32)


def relax_in_span(virtual: np.ndarray, real: np.ndarray, steps: int, *, scale: float = 32.0,
                  lr: float = 0.05) -> np.ndarray:
  """`steps` of gradient descent on the sphere moving each of the unit `virtual` rows `[k, d]`
  away from the unit `real` rows `[n, d]` and from the other virtual rows: the loss of a row
  is logsumexp(`scale` · its cosines to every real row and every other virtual row) / `scale`
  (ArcFace's logits at stage 1's scale with the row as a class that no face belongs to, as
  stage 1 treats virtual rows). The gradient is a combination of the rows themselves, so rows
  inside the span of `real` (pass real rows projected onto it: the same cosines for rows
  inside) stay inside it. Host float64;
  `O(steps · k · (n + k) · d)`, meant for demo-sized heads (the demo's 800 × 1,600 × 128: 300
  steps in 26 s on 2 CPU cores shared with two other jobs).
  """
  if int(steps) < 0:
    raise ValueError(f"steps={steps} must be ≥ 0")
  v = np.asarray(virtual, np.float64).copy()
  r = np.asarray(real, np.float64)
  n = r.shape[0]
  for _ in range(int(steps)):
    logits = np.concatenate([v @ r.T, v @ v.T], axis=1) * float(scale)
    logits[:, n:][np.diag_indices(v.shape[0])] = -np.inf  # not itself
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    grad = p[:, :n] @ r + p[:, n:] @ v
    grad -= np.sum(grad * v, axis=1, keepdims=True) * v  # along the sphere
    v -= float(lr) * grad
    v /= np.linalg.norm(v, axis=1, keepdims=True)
  return v.astype(np.float32)


def _scan(x: np.ndarray, n: int, block: int, *, nearest: bool
          ) -> tuple[dict[str, _PairGroup], dict[str, np.ndarray] | None]:
  """Host scan of `x [C, d]` rows `block` at a time: pair groups and (if `nearest`) per-row
  nearest neighbours."""
  num_classes = x.shape[0]
  groups = {"virtual_real": _PairGroup(), "virtual_virtual": _PairGroup(),
            "real_real": _PairGroup()}
  near_real_idx = np.full(num_classes, -1, np.int64)
  near_real_cos = np.full(num_classes, np.nan, np.float32)
  near_idx = np.full(num_classes, -1, np.int64)
  near_cos = np.full(num_classes, np.nan, np.float32)

  for start in range(0, num_classes, block):
    stop = min(start + block, num_classes)
    rows = np.arange(start, stop)
    sim = x[start:stop] @ x.T  # [b, C] float32
    np.clip(sim, -1.0, 1.0, out=sim)
    is_real = rows < n
    r_real, r_virt = np.flatnonzero(is_real), np.flatnonzero(~is_real)

    # Pair statistics, each distinct pair once: virtual rows × real columns, and within a
    # group only the columns after the row (the in-block square's strict upper triangle plus
    # every later column of the group).
    if r_real.size:
      lo, hi = start + r_real[0], start + r_real[-1] + 1
      sub = sim[r_real[0]:r_real[-1] + 1]
      groups["real_real"].add_within(sub, lo, hi)
      groups["real_real"].add(sub[:, hi:n])
    if r_virt.size:
      lo, hi = start + r_virt[0], start + r_virt[-1] + 1
      sub = sim[r_virt[0]:r_virt[-1] + 1]
      groups["virtual_real"].add(sub[:, :n])
      groups["virtual_virtual"].add_within(sub, lo, hi)
      groups["virtual_virtual"].add(sub[:, hi:])
    if not nearest:
      continue

    sim[rows - start, rows] = -np.inf  # a row is not its own neighbour
    if n:
      real_part = sim[:, :n]
      idx = real_part.argmax(axis=1)
      best = real_part[np.arange(stop - start), idx]
      ok = np.isfinite(best)
      near_real_idx[start:stop] = np.where(ok, idx, -1)
      near_real_cos[start:stop] = np.where(ok, best, np.nan)
    if num_classes > 1:
      idx = sim.argmax(axis=1)
      near_idx[start:stop] = idx
      near_cos[start:stop] = sim[np.arange(stop - start), idx]
  if not nearest:
    return groups, None
  return groups, {"nearest_real_index": near_real_idx, "nearest_real_cosine": near_real_cos,
                  "nearest_index": near_idx, "nearest_cosine": near_cos}


def _first_other(sims: np.ndarray, index: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the best of its `[N, 2]` neighbours that is not the row itself (-1/NaN: none)."""
  pick = (index[:, 0] == rows).astype(np.int64)  # skip the row itself when it comes first
  ok = pick < index.shape[1]  # indices are distinct: the next one is another row
  pick = np.minimum(pick, index.shape[1] - 1)
  idx = index[np.arange(len(rows)), pick]
  cos = sims[np.arange(len(rows)), pick]
  return (np.where(ok, idx, -1).astype(np.int64),
          np.where(ok, np.clip(cos, -1.0, 1.0), np.nan).astype(np.float32))


def _nearest_on_devices(x: np.ndarray, n: int, mesh: Any) -> dict[str, np.ndarray]:
  """The per-row nearest neighbours of `_scan`, from the sharded exact search."""
  from vigface_jax.generate import search  # pylint: disable=g-import-not-at-top
  num_classes = x.shape[0]
  rows = np.arange(num_classes)
  out = {"nearest_real_index": np.full(num_classes, -1, np.int64),
         "nearest_real_cosine": np.full(num_classes, np.nan, np.float32)}
  if n:
    sims, index = search.nearest(x, x[:n], k=min(2, n), mesh=mesh)
    out["nearest_real_index"], out["nearest_real_cosine"] = _first_other(sims, index, rows)
  if num_classes > 1:
    sims, index = search.nearest(x, x, k=2, mesh=mesh)
    out["nearest_index"], out["nearest_cosine"] = _first_other(sims, index, rows)
  else:
    out["nearest_index"] = np.full(num_classes, -1, np.int64)
    out["nearest_cosine"] = np.full(num_classes, np.nan, np.float32)
  return out


def _verdict(result: dict[str, Any]) -> dict[str, Any]:
  """The privacy criterion of DESIGN §1 on the nearest-neighbour summaries."""
  v99 = result["nearest_real_to_virtual"]["p99"]
  r50 = result["nearest_real_to_real"]["p50"]
  out: dict[str, Any] = {
      "criterion": "p99(nearest real cosine of virtual rows) < "
                   "median(nearest other-real cosine of real rows)",
      "virtual_nearest_real_p99": v99, "real_nearest_real_median": r50, "passed": None,
  }
  if result["num_virtual"] == 0:
    out["reason"] = "no virtual rows"
  elif result["num_real"] < 2:
    out["reason"] = "fewer than 2 real rows: no real nearest-neighbour reference"
  else:
    out["passed"] = bool(v99 < r50)
  return out


def _sample_rows(num_real: int, num_virtual: int, sample: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted real and virtual row indices, about half the sample each (the rest from the other)."""
  rng = np.random.default_rng(seed)
  take_r = min(num_real, max(sample - min(num_virtual, sample // 2), 0))
  take_v = min(num_virtual, sample - take_r)
  real = np.sort(rng.choice(num_real, take_r, replace=False)) if take_r else np.zeros(0, int)
  virt = (np.sort(rng.choice(num_virtual, take_v, replace=False)) + num_real
          if take_v else np.zeros(0, int))
  return real, virt


def similarity_figure(centres: Any, num_real: int, path: str | os.PathLike, *,
                      sample: int = 256, seed: int = 0, class_axis: int = 1) -> None:
  """Writes a PNG of the cosine-similarity matrix of sampled rows (the paper's Figure 3).

  Args:
    centres: as in `separability`.
    num_real: `n`, the number of real classes.
    path: the PNG to write.
    sample: rows shown in total (about half real, half virtual when both exist).
    seed: sampling seed.
    class_axis: as in `separability`.
  """
  # Imported here: matplotlib is only needed for the report, and Agg must be chosen before
  # pyplot loads so this works on display-less hosts.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  x = _rows(centres, class_axis)
  real, virt = _sample_rows(num_real, x.shape[0] - num_real, sample, seed)
  sel = x[np.concatenate([real, virt])]
  sim = np.clip(sel @ sel.T, -1.0, 1.0)
  m = sel.shape[0]

  fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
  try:
    image = ax.imshow(sim, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ticks, labels = [], []
    if real.size:
      ticks.append((real.size - 1) / 2)
      labels.append(f"real ({real.size} of {num_real})")
    if virt.size:
      ticks.append(real.size + (virt.size - 1) / 2)
      labels.append(f"virtual ({virt.size} of {x.shape[0] - num_real})")
    if real.size and virt.size:
      for line in (ax.axhline, ax.axvline):
        line(real.size - 0.5, color="black", linewidth=1.0)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, rotation=90, va="center")
    ax.set_xlim(-0.5, max(m, 1) - 0.5)
    ax.set_ylim(max(m, 1) - 0.5, -0.5)
    ax.set_title("Class-centre cosine similarity")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
  finally:
    plt.close(fig)


def write_report(workdir: str | os.PathLike, centres: Any, num_real: int, *,
                 num_classes: int | None = None, sample: int = 256, block: int = 4096,
                 class_axis: int = 1, device_above: int = DEVICE_ABOVE,
                 pair_sample: int = PAIR_SAMPLE, gather_block: int = 65_536
                 ) -> dict[str, Any] | None:
  """Writes `prototypes.npz`, `separability.json` and `prototype_similarity.png` to `workdir`.

  `prototypes.npz` holds `real [n, d]` and `virtual [k, d]` (L2-normalised float32) and the
  `per_row` nearest-neighbour arrays of `separability`; `separability.json` is its dict without
  `per_row`. Call it on every process: a `jax.Array` sharded across processes is brought to the
  hosts `gather_block` classes at a time (`parallel.fetch_in_blocks`: no device ever holds the
  whole matrix), then only process 0 computes and writes. Columns from `num_classes` on (the
  head's padding) are dropped.

  Returns:
    The `separability` dict on process 0; None on the others.
  """
  if isinstance(centres, jax.Array):
    centres = parallel.fetch_in_blocks(centres, class_axis, gather_block)
  if jax.process_index() != 0:
    return None
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  x = _rows(centres, class_axis)
  if num_classes is not None:
    x = x[:int(num_classes)]
  report = separability(x, num_real, block=block, class_axis=0, device_above=device_above,
                        pair_sample=pair_sample)
  per_row = report["per_row"]
  np.savez(os.path.join(workdir, "prototypes.npz"), real=x[:num_real],
           virtual=x[num_real:], **per_row)
  metrics.write_json(os.path.join(workdir, "separability.json"),
                     {key: val for key, val in report.items() if key != "per_row"})
  similarity_figure(x, num_real, os.path.join(workdir, "prototype_similarity.png"),
                    sample=sample, class_axis=0)
  verdict = report["verdict"]
  logging.info("Prototype separability: max cos virtual-real %s, mean %s; verdict %s (%s vs %s)",
               report["virtual_real"]["max"], report["virtual_real"]["mean"],
               verdict["passed"], verdict["virtual_nearest_real_p99"],
               verdict["real_nearest_real_median"])
  return report
