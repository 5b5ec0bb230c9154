"""The privacy audit's statistics: are generated people any closer to training people than
unrelated real people are?

A claim of "no real person in the data" is only as good as the test that could have refuted
it (DESIGN.md §1). This module computes that test from embeddings alone, per encoder (the
stage-1 network and at least one independent FR model); it reads no dataset and loads no
model. Every set is an `Embedded(emb [n, d], labels [n])` of one encoder; embeddings may have
any norm and are L2-normalised here, so every similarity below is a cosine.

Sets: *training* (the gallery: the real images and identities the models were trained on),
*generated* (the identities under audit), *held-out* (real people not in the training data)
and optionally *leak* (identities generated from real training rows, i.e. planted leaks, each
carrying the training label it came from in `true_labels`).

Statistics of an identity i against a gallery:
* class statistic C(i) = max over gallery identities g of cos(centre_i, centre_g), with that g
  ("nearest real label"). A centre is the mean of an identity's unit embeddings, renormalised.
* image statistic I(i) = mean over i's images of each image's top-1 cosine to any gallery
  image (exact nearest neighbour, `search.Searcher`), with the gallery identity most often
  nearest (ties: the smallest label). Per image the top-1 cosine and gallery row are kept.

Steps of `audit_encoder`:
1. Calibration from real data. Impostor thresholds on the training images
   (`impostor_calibration`): t_f is the smallest impostor cosine such that the fraction of
   impostor cosines > t_f is <= f, i.e. the order statistic s_(P - floor(f·P)) of the P
   impostor cosines sorted ascending (the (1 - f) quantile, 'higher' side). The pairs are all
   different-label pairs when there are at most `max_pairs`, else a uniform, seeded sample of
   `max_pairs` distinct different-label pairs. An FMR with fewer than 10 / f pairs is not
   calibrated: its threshold is None and a note says how many pairs it needs (the verdict's
   FMR, `options.verdict_fmr`, must be calibrated, or the audit stops with a ValueError).
   Also real↔real: each training identity's cosine to its nearest *other* training centre.
2. The held-out identities are split by the parity of their position in sorted label order:
   even positions are half A (calibration), odd positions half B (evaluation). Flag
   thresholds: τ_C = the `options.quantile` quantile ('higher') of C over half A, τ_I the same
   for I. An unrelated real person is therefore flagged with probability ≈ 1 - quantile by
   construction; half B, never used to set τ, measures that false-flag rate honestly.
3. Generated identities: C, I, class flag C > τ_C, image flag I > τ_I, flagged = either.
   Image level: the fraction of generated images whose top-1 training cosine exceeds each
   impostor threshold, beside the same fraction for half-B (and leak) images.
4. Leak control: the same statistics for the leak identities; detection rates at class level,
   image level and either, and the fraction whose nearest training identity (class level) is
   their true training label.
5. People outside the training set: with half A's identities as the gallery (a population the
   generator never saw), C of generated identities beside C of half-B identities, and the
   fraction of each above the `quantile` quantile of the half-B distribution. Descriptive.
6. Verdict. With n generated identities and reference rate p = max(p_B, 1 - quantile), where
   p_B is half B's false-flag rate, the class (and separately the image) flag test passes iff
   the generated flagged count <= binom.ppf(1 - alpha, n, p) (alpha = 0.01: the one-sided 99%
   upper bound of what unrelated real people show). The image-level test passes iff the
   generated images above t_{verdict_fmr} are not significantly more frequent than half B's:
   one-sided Fisher exact test on [[gen above, gen not], [B above, B not]], p-value >= alpha
   (images of one identity are correlated, so this errs towards failing). `passed` = all three.
   `control` = the leak detection rates; `conclusive` = class-level leak detection >=
   `options.min_control` (False without a leak set). A non-conclusive audit is not a pass:
   `verdict` is 'fail' if not passed, else 'pass' if conclusive, else 'inconclusive'.

`combine` joins encoders (overall pass needs every encoder to pass and be conclusive). The
writers make `audit.json`, `audit_identities.csv`, `audit_hist.png` and `audit_closest.png`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import csv
import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy import stats

from vigface_jax import ops
from vigface_jax.generate import search

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_DROPPED = ("per_identity", "per_image")  # what `write_json` leaves out


@dataclasses.dataclass(frozen=True)
class Embedded:
  """One encoder's embeddings of a set of images.

  Attributes:
    emb: float `[n, d]` embeddings, any norm.
    labels: `[n]` identity label of each image.
    true_labels: leak sets only: `[n]` the training label each image's identity was
      generated from (one value per identity).
  """

  emb: np.ndarray
  labels: np.ndarray
  true_labels: np.ndarray | None = None

  def __post_init__(self):
    emb = np.asarray(self.emb, np.float32)
    labels = np.asarray(self.labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
      raise ValueError(f"Embedded: emb must be [n, d] and labels [n], got {emb.shape} and "
                       f"{labels.shape}; give one label per embedding row.")
    if not np.isfinite(emb).all():
      raise ValueError("Embedded: emb holds NaN or inf; repair or drop those rows.")
    object.__setattr__(self, "emb", emb)
    object.__setattr__(self, "labels", labels)
    if self.true_labels is not None:
      true = np.asarray(self.true_labels)
      if true.shape != labels.shape:
        raise ValueError(f"Embedded: true_labels has shape {true.shape}, labels {labels.shape}; "
                         "give each leak image the training label its identity came from.")
      pairs = np.unique(np.stack([labels, true]).T, axis=0)
      if len(pairs) != len(np.unique(labels)):
        raise ValueError("Embedded: an identity carries more than one true_label; each leak "
                         "identity comes from exactly one training identity.")
      object.__setattr__(self, "true_labels", true)


@dataclasses.dataclass(frozen=True)
class AuditOptions:
  """How `audit_encoder` calibrates and decides (see the module docstring)."""

  quantile: float = 0.99  # of half A's C and I: the flag thresholds τ_C, τ_I
  min_control: float = 0.95  # class-level leak detection needed for a conclusive audit
  alpha: float = 0.01  # one-sided significance of the verdict's tests
  fmrs: tuple[float, ...] = (1e-3, 1e-4)  # impostor thresholds reported
  verdict_fmr: float = 1e-3  # the impostor threshold of the image-level verdict test
  max_pairs: int = 2_000_000  # impostor pairs used for calibration
  seed: int = 0  # of the impostor-pair sample
  bins: int = 100  # fixed histogram bins over [-1, 1]
  mesh: Any = None  # search: devices the galleries are sharded over (None: local devices)
  query_chunk: int = 4096
  gallery_chunk: int | None = None
  dtype: Any = jnp.bfloat16
  progress: bool = False

  def __post_init__(self):
    for name in ("quantile", "min_control", "alpha"):
      if not 0.0 < float(getattr(self, name)) <= 1.0:
        raise ValueError(f"AuditOptions.{name}={getattr(self, name)}: must be in (0, 1].")
    if not self.fmrs or any(not 0.0 < float(f) < 1.0 for f in self.fmrs):
      raise ValueError(f"AuditOptions.fmrs={self.fmrs}: give false-match rates in (0, 1).")
    if float(self.verdict_fmr) not in [float(f) for f in self.fmrs]:
      raise ValueError(f"AuditOptions.verdict_fmr={self.verdict_fmr}: must be one of fmrs "
                       f"{self.fmrs}.")
    if int(self.max_pairs) < 1 or int(self.bins) < 1:
      raise ValueError("AuditOptions.max_pairs and bins must be positive.")


# ------------------------------------------------------------------ small statistics


def summary(values: Any) -> dict[str, Any]:
  """n, mean, std, min, max and the `PERCENTILES` of `values` (None when empty)."""
  v = np.asarray(values, np.float64).ravel()
  keys = ["mean", "std", "min", "max"] + [f"p{p}" for p in PERCENTILES]
  vals = ([v.mean(), v.std(), v.min(), v.max()] + list(np.percentile(v, PERCENTILES))
          if v.size else [None] * len(keys))
  return {"n": int(v.size), **{k: None if x is None else float(x) for k, x in zip(keys, vals)}}


def histogram(values: Any, bins: int) -> list[int]:
  """Counts of `values` in `bins` equal bins over [-1, 1] (values clipped into the range)."""
  v = np.clip(np.asarray(values, np.float64).ravel(), -1.0, 1.0)
  return np.histogram(v, bins=bins, range=(-1.0, 1.0))[0].astype(int).tolist()


def upper_quantile(values: np.ndarray, q: float) -> float:
  """The q quantile of `values`, 'higher' method (an observed value)."""
  return float(np.quantile(np.asarray(values, np.float64), q, method="higher"))


def _rate(mask: np.ndarray) -> float | None:
  return float(np.mean(mask)) if mask.size else None


# ------------------------------------------------------------------ calibration


def impostor_pairs_needed(fmr: float) -> int:
  """Impostor pairs needed to calibrate `fmr`: 10 / fmr (ten expected false matches)."""
  return int(math.ceil(10.0 / float(fmr) - 1e-9))


def impostor_pairs(labels: Any, max_pairs: int = 2_000_000,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """`(i, j, available)`: image pairs with different labels, i < j.

  All of them when `available` (the number of different-label pairs) is <= `max_pairs`, else
  a uniform sample of `max_pairs` distinct ones drawn with `numpy.random.default_rng(seed)`.
  """
  labels = np.asarray(labels)
  n = labels.size
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  available = n * (n - 1) // 2 - int(np.sum(counts.astype(np.int64) * (counts - 1) // 2))
  rng = np.random.default_rng(seed)
  if available <= 2 * max_pairs:  # enumerate: group by label, pair each group with later ones
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    ii, jj = [], []
    for g in range(len(counts) - 1):
      group, later = order[starts[g]:starts[g + 1]], order[starts[g + 1]:]
      ii.append(np.repeat(group, later.size))
      jj.append(np.tile(later, group.size))
    if not ii:
      return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    i, j = np.concatenate(ii), np.concatenate(jj)
    if available > max_pairs:
      keep = np.sort(rng.choice(available, size=max_pairs, replace=False))
      i, j = i[keep], j[keep]
    return np.minimum(i, j), np.maximum(i, j), available
  codes = np.zeros(0, np.int64)  # i * n + j; i.i.d. draws, deduplicated, then subsampled
  while codes.size < max_pairs:
    draw = rng.integers(0, n, size=(2, 2 * (max_pairs - codes.size) + 1024))
    ok = inverse[draw[0]] != inverse[draw[1]]
    a, b = np.minimum(*draw[:, ok]), np.maximum(*draw[:, ok])
    codes = np.unique(np.concatenate([codes, a.astype(np.int64) * n + b]))
  codes = np.sort(rng.choice(codes, size=max_pairs, replace=False))
  return codes // n, codes % n, available


def threshold_at_fmr(cosines: np.ndarray, fmr: float) -> float:
  """The smallest impostor cosine t with fraction(cosines > t) <= fmr."""
  c = np.asarray(cosines, np.float64).ravel()
  allowed = int(math.floor(fmr * c.size + 1e-9))
  pos = c.size - 1 - allowed
  return float(np.partition(c, pos)[pos])


def impostor_calibration(emb: Any, labels: Any, fmrs: Sequence[float] = (1e-3, 1e-4),
                         max_pairs: int = 2_000_000, seed: int = 0) -> dict[str, Any]:
  """Impostor thresholds with their pairs' count, the observed FMR and notes.

  Returns:
    `{'thresholds': {fmr: cosine or None}, 'observed_fmr': {fmr: ...}, 'pairs': P,
    'available': all different-label pairs, 'sampled': bool, 'notes': [str],
    'cosines': the impostor cosines}`.
  """
  unit = ops.l2_normalize_np(np.asarray(emb, np.float32))
  labels = np.asarray(labels)
  if unit.ndim != 2 or labels.shape != (unit.shape[0],):
    raise ValueError(f"impostor calibration: emb {unit.shape} and labels {labels.shape} must "
                     "be [n, d] and [n].")
  i, j, available = impostor_pairs(labels, max_pairs, seed)
  if not i.size:
    raise ValueError("impostor calibration: the training images hold fewer than two "
                     "identities, so there are no impostor pairs; add identities.")
  cos = np.concatenate([np.einsum("nd,nd->n", unit[i[s:s + 65536]], unit[j[s:s + 65536]])
                        for s in range(0, i.size, 65536)]).astype(np.float32)
  out: dict[str, Any] = {"thresholds": {}, "observed_fmr": {}, "pairs": int(cos.size),
                         "available": int(available), "sampled": bool(available > cos.size),
                         "notes": [], "cosines": cos}
  for f in fmrs:
    f = float(f)
    need = impostor_pairs_needed(f)
    if cos.size < need:
      out["thresholds"][f] = out["observed_fmr"][f] = None
      out["notes"].append(f"FMR {f:g} cannot be calibrated: it needs at least {need} impostor "
                          f"pairs, the training images give {cos.size}; add images or "
                          "identities, or drop this FMR.")
      continue
    t = threshold_at_fmr(cos, f)
    out["thresholds"][f] = t
    out["observed_fmr"][f] = float(np.mean(cos > t))
  return out


def impostor_thresholds(emb: Any, labels: Any, fmrs: Sequence[float] = (1e-3, 1e-4),
                        max_pairs: int = 2_000_000, seed: int = 0) -> dict[float, float | None]:
  """`{fmr: cosine}` at each FMR of real impostor pairs; None where too few pairs exist."""
  return impostor_calibration(emb, labels, fmrs, max_pairs, seed)["thresholds"]


# ------------------------------------------------------------------ identity statistics


def centres(emb: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """`(sorted unique labels, unit centres)`: mean of unit embeddings per label, renormalised."""
  unit = ops.l2_normalize_np(np.asarray(emb, np.float32))
  uniq, inverse, counts = np.unique(np.asarray(labels), return_inverse=True,
                                    return_counts=True)
  if not uniq.size:
    raise ValueError("centres: no embeddings given.")
  if (np.diff(inverse) < 0).any():  # rows grouped by label already need no reordered copy
    unit = unit[np.argsort(inverse, kind="stable")]
  sums = np.add.reduceat(unit, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
  return uniq, ops.l2_normalize_np(sums / counts[:, None])


def _searcher(gallery: np.ndarray, o: AuditOptions) -> search.Searcher:
  return search.Searcher(gallery, mesh=o.mesh, query_chunk=o.query_chunk,
                         gallery_chunk=o.gallery_chunk, dtype=o.dtype, progress=o.progress)


def _mode_labels(inverse: np.ndarray, n_ids: int, nearest: np.ndarray) -> np.ndarray:
  """Per identity, the most frequent value of `nearest` (ties: the smallest)."""
  values, vinv = np.unique(nearest, return_inverse=True)
  codes, counts = np.unique(inverse.astype(np.int64) * values.size + vinv, return_counts=True)
  ident, val = codes // values.size, codes % values.size
  order = np.lexsort((val, -counts, ident))
  first = np.concatenate([[True], np.diff(ident[order]) != 0])
  out = np.empty(n_ids, values.dtype)
  out[ident[order][first]] = values[val[order][first]]
  return out


def _identity_stats(s: Embedded, centre_search: search.Searcher, image_search: search.Searcher,
                    gallery_labels: np.ndarray, train_labels: np.ndarray) -> dict[str, Any]:
  """C and I of every identity of `s` against the training gallery, plus per-image top-1."""
  uniq, cen = centres(s.emb, s.labels)
  c_cos, c_idx = centre_search(cen, 1)
  i_cos, i_idx = image_search(ops.l2_normalize_np(s.emb), 1)
  inverse = np.searchsorted(uniq, s.labels)
  out = {"label": uniq, "centre": cen, "class_cosine": c_cos[:, 0],
         "nearest_label": gallery_labels[c_idx[:, 0]],
         "image_mean_top1": np.bincount(inverse, weights=i_cos[:, 0]) / np.bincount(inverse),
         "image_nearest_label": _mode_labels(inverse, uniq.size, train_labels[i_idx[:, 0]]),
         "image_top1": i_cos[:, 0], "image_train_row": i_idx[:, 0], "image_identity": inverse}
  if s.true_labels is not None:  # one per identity (checked by Embedded): its first row's
    out["true_label"] = s.true_labels[np.unique(inverse, return_index=True)[1]]
  return out


def _as_embedded(x: Any, name: str) -> Embedded | None:
  if x is None or isinstance(x, Embedded):
    return x
  try:
    return Embedded(*x)
  except TypeError as e:
    raise ValueError(f"{name}: give an Embedded or (emb, labels[, true_labels]), got "
                     f"{type(x).__name__}") from e


# ------------------------------------------------------------------ the audit


def audit_encoder(name: str, *, generated: Any, training: Any, heldout: Any, leak: Any = None,
                  options: AuditOptions | None = None) -> dict[str, Any]:
  """The privacy audit of one encoder's embeddings (steps 1-6 of the module docstring).

  Args:
    name: the encoder's name (reported).
    generated: `Embedded` (or `(emb, labels)`) of the generated images.
    training: the real training images (the gallery).
    heldout: real images of people not in the training data (at least 2 identities).
    leak: optional images of identities generated from real training rows, with
      `true_labels`; without it the audit cannot be conclusive.
    options: `AuditOptions`.

  Returns:
    A dict of every figure; per-identity and per-image arrays under 'per_identity' and
    'per_image' (which `write_json` drops).
  """
  o = options or AuditOptions()
  gen, train = _as_embedded(generated, "generated"), _as_embedded(training, "training")
  held, leak = _as_embedded(heldout, "heldout"), _as_embedded(leak, "leak")
  for set_name, s in (("generated", gen), ("training", train), ("heldout", held),
                      ("leak", leak)):
    if s is None and set_name != "leak":
      raise ValueError(f"audit_encoder({name}): {set_name} is required.")
    if s is not None and (s.emb.shape[0] == 0 or s.emb.shape[1] != train.emb.shape[1]):
      raise ValueError(f"audit_encoder({name}): {set_name} has shape {s.emb.shape}; every set "
                       f"needs rows of the training dimension {train.emb.shape[1]} from the "
                       "same encoder.")
  if leak is not None and leak.true_labels is None:
    raise ValueError(f"audit_encoder({name}): leak needs true_labels, the training label each "
                     "leak identity was generated from.")

  # 1. Calibration from real data.
  train_unit = ops.l2_normalize_np(train.emb)
  calib = impostor_calibration(train_unit, train.labels, o.fmrs, o.max_pairs, o.seed)
  thresholds = calib["thresholds"]
  if thresholds[float(o.verdict_fmr)] is None:
    raise ValueError(f"audit_encoder({name}): " + " ".join(calib["notes"]) +
                     " The verdict needs options.verdict_fmr calibrated.")
  t_labels, t_centres = centres(train_unit, train.labels)
  if t_labels.size < 2:
    raise ValueError(f"audit_encoder({name}): training has {t_labels.size} identity; the "
                     "audit needs at least 2.")
  centre_search, image_search = _searcher(t_centres, o), _searcher(train_unit, o)
  rr_cos, rr_idx = centre_search(t_centres, 2)
  pick = (rr_idx[:, :1] == np.arange(t_labels.size)[:, None]).astype(int)  # self first: 2nd
  rr_cos = np.take_along_axis(rr_cos, pick, 1)[:, 0]
  rr_label = t_labels[np.take_along_axis(rr_idx, pick, 1)[:, 0]]

  def stats_of(s):
    return _identity_stats(s, centre_search, image_search, t_labels, train.labels)

  g, h = stats_of(gen), stats_of(held)
  lk = stats_of(leak) if leak is not None else None
  if lk is not None and not np.isin(lk["true_label"], t_labels).all():
    bad = lk["true_label"][~np.isin(lk["true_label"], t_labels)][0].item()
    raise ValueError(f"audit_encoder({name}): leak true label {bad!r} is not a training "
                     "label; a leak identity must come from a training identity.")

  # 2. Held-out halves and the flag thresholds.
  if h["label"].size < 2:
    raise ValueError(f"audit_encoder({name}): heldout has {h['label'].size} identity; it "
                     "needs at least 2 (half A calibrates, half B evaluates).")
  half_a = np.arange(h["label"].size) % 2 == 0
  half_b = ~half_a
  tau_c = upper_quantile(h["class_cosine"][half_a], o.quantile)
  tau_i = upper_quantile(h["image_mean_top1"][half_a], o.quantile)

  def flags(st):
    st["class_flag"] = st["class_cosine"] > tau_c
    st["image_flag"] = st["image_mean_top1"] > tau_i
    st["flagged"] = st["class_flag"] | st["image_flag"]
    return {"n": int(st["label"].size), "class": _rate(st["class_flag"]),
            "image": _rate(st["image_flag"]), "either": _rate(st["flagged"]),
            "class_count": int(st["class_flag"].sum()),
            "image_count": int(st["image_flag"].sum()), "count": int(st["flagged"].sum())}

  gen_rates = flags(g)
  flags(h)  # sets the held-out flags; their rates are reported per half
  a_rates, b_rates = ({"n": int(m.sum()), **{k: _rate(h[f][m]) for k, f in (
      ("class", "class_flag"), ("image", "image_flag"), ("either", "flagged"))}}
                      for m in (half_a, half_b))

  # 3. Image-level fractions above each impostor threshold.
  b_images = half_b[h["image_identity"]]
  image_fractions = {f: {"threshold": t, "generated": _rate(g["image_top1"] > t),
                         "heldout_b": _rate(h["image_top1"][b_images] > t),
                         "leak": _rate(lk["image_top1"] > t) if lk is not None else None}
                     for f, t in thresholds.items() if t is not None}

  # 4. Leak control.
  control = None
  if lk is not None:
    control = {k: v for k, v in flags(lk).items() if not k.endswith("count")}
    control["nearest_is_true_label"] = _rate(lk["nearest_label"] == lk["true_label"])

  # 5. People outside the training set: half A as the gallery.
  outside_search = _searcher(h["centre"][half_a], o)
  out_gen = outside_search(g["centre"], 1)[0][:, 0]
  out_b = outside_search(h["centre"][half_b], 1)[0][:, 0]
  out_thr = upper_quantile(out_b, o.quantile)
  outside = {"threshold": out_thr, "generated_above": _rate(out_gen > out_thr),
             "heldout_b_above": _rate(out_b > out_thr)}

  # 6. Verdict.
  n_gen = gen_rates["n"]
  tests = {}
  for level in ("class", "image"):
    p_ref = max(b_rates[level], 1.0 - o.quantile)
    bound = int(stats.binom.ppf(1.0 - o.alpha, n_gen, p_ref))
    count = gen_rates[f"{level}_count"]
    tests[level] = {"count": count, "n": n_gen, "reference_rate": p_ref, "upper_bound": bound,
                    "passed": bool(count <= bound)}
  t_v = thresholds[float(o.verdict_fmr)]
  x, n_x = int((g["image_top1"] > t_v).sum()), int(g["image_top1"].size)
  y, n_y = int((h["image_top1"][b_images] > t_v).sum()), int(b_images.sum())
  p_value = float(stats.fisher_exact([[x, n_x - x], [y, n_y - y]], alternative="greater")[1])
  tests["image_fraction"] = {"fmr": float(o.verdict_fmr), "threshold": t_v,
                             "generated": [x, n_x], "heldout_b": [y, n_y], "p_value": p_value,
                             "passed": bool(p_value >= o.alpha)}
  passed = all(t["passed"] for t in tests.values())
  conclusive = bool(control is not None and control["class"] >= o.min_control)
  verdict = "fail" if not passed else ("pass" if conclusive else "inconclusive")

  def sets(key, b_mask, a_mask=None):
    out = {"generated": g[key], "heldout_b": h[key][b_mask]}
    out.update({} if a_mask is None else {"heldout_a": h[key][a_mask]})
    return out | ({} if lk is None else {"leak": lk[key]})

  groups = {"class": sets("class_cosine", half_b, half_a) | {"training_nearest_other": rr_cos},
            "image": sets("image_mean_top1", half_b, half_a),
            "image_top1": sets("image_top1", b_images),
            "outside": {"generated": out_gen, "heldout_b": out_b}}

  def per_identity(st, extra=None):
    keys = ("label", "class_cosine", "nearest_label", "image_mean_top1",
            "image_nearest_label", "class_flag", "image_flag", "flagged", "true_label")
    return {**{k: st[k] for k in keys if k in st}, **(extra or {})}

  def per_image(st):
    return {"top1_cosine": st["image_top1"], "train_row": st["image_train_row"],
            "identity": st["label"][st["image_identity"]]}

  return {
      "encoder": name,
      "verdict": verdict, "passed": passed, "conclusive": conclusive, "control": control,
      "tests": tests,
      "thresholds": {"impostor": thresholds, "impostor_observed_fmr": calib["observed_fmr"],
                     "impostor_pairs": calib["pairs"], "impostor_available": calib["available"],
                     "impostor_sampled": calib["sampled"], "notes": calib["notes"],
                     "class": tau_c, "image": tau_i, "quantile": o.quantile},
      "counts": {"training_images": int(train.labels.size),
                 "training_identities": int(t_labels.size),
                 "generated_images": int(gen.labels.size), "generated_identities": n_gen,
                 "heldout_images": int(held.labels.size),
                 "heldout_identities": int(h["label"].size),
                 "leak_identities": None if lk is None else int(lk["label"].size)},
      "rates": {"generated": gen_rates, "heldout_a": a_rates, "heldout_b": b_rates,
                "control": control},
      "image_fractions": image_fractions,
      "outside": outside,
      "distributions": {k: {s: summary(v) for s, v in d.items()} for k, d in groups.items()}
                       | {"impostor": summary(calib["cosines"])},
      "histograms": {"edges": np.linspace(-1.0, 1.0, o.bins + 1).tolist(),
                     **{k: {s: histogram(v, o.bins) for s, v in d.items()}
                        for k, d in groups.items()}},
      "flagged_labels": g["label"][g["flagged"]].tolist(),
      "per_identity": {
          "generated": per_identity(g),
          "heldout": per_identity(h, {"half": np.where(half_a, "A", "B")}),
          "leak": per_identity(lk) if lk is not None else None,
          "training": {"label": t_labels, "nearest_other_cosine": rr_cos,
                       "nearest_other_label": rr_label}},
      "per_image": {"generated": per_image(g), "heldout": per_image(h),
                    "leak": per_image(lk) if lk is not None else None},
  }


def closest_pairs(report: Mapping[str, Any], n: int = 16) -> list[tuple[int, int, float]]:
  """The `n` generated images closest to a training image: `(generated row, training row,
  cosine)`, closest first (rows index the arrays given to `audit_encoder`)."""
  img = report["per_image"]["generated"]
  order = np.lexsort((np.arange(img["top1_cosine"].size), -img["top1_cosine"]))[:n]
  return [(int(r), int(img["train_row"][r]), float(img["top1_cosine"][r])) for r in order]


def combine(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """All encoders' verdicts: overall pass needs every encoder to pass and be conclusive.

  Returns:
    `{'verdict', 'passed', 'conclusive', 'encoders': names, 'flagged_labels': the union,
    'rates': {figure: {encoder: value}}, 'reports': reports}`.
  """
  if not reports:
    raise ValueError("combine: no encoder reports; audit at least the stage-1 network and one "
                     "independent encoder.")
  label_sets = {}
  for enc, r in reports.items():
    if "passed" not in r or "conclusive" not in r:
      raise ValueError(f"combine: report {enc!r} is not an audit_encoder report.")
    if "per_identity" in r:
      label_sets[enc] = r["per_identity"]["generated"]["label"].tolist()
  if len({tuple(v) for v in label_sets.values()}) > 1:
    raise ValueError("combine: the encoders audited different generated identities; embed the "
                     "same generated set with every encoder.")
  passed = all(bool(r["passed"]) for r in reports.values())
  conclusive = all(bool(r["conclusive"]) for r in reports.values())
  figures = {  # name: (section, key) of each report
      "class_flag_rate": ("generated", "class"), "image_flag_rate": ("generated", "image"),
      "flag_rate": ("generated", "either"), "heldout_b_class_flag_rate": ("heldout_b", "class"),
      "heldout_b_image_flag_rate": ("heldout_b", "image"), "control_class": ("control", "class"),
      "control_image": ("control", "image"),
      "control_nearest_is_true_label": ("control", "nearest_is_true_label")}
  rates = {k: {enc: (r["rates"][sec] or {}).get(key) for enc, r in reports.items()}
           for k, (sec, key) in figures.items()}
  for k in ("class", "image"):
    rates[f"threshold_{k}"] = {enc: r["thresholds"][k] for enc, r in reports.items()}
  rates["verdict"] = {enc: r["verdict"] for enc, r in reports.items()}
  flagged = sorted({lab for r in reports.values() for lab in r["flagged_labels"]})
  return {"verdict": "fail" if not passed else ("pass" if conclusive else "inconclusive"),
          "passed": passed, "conclusive": conclusive, "encoders": list(reports),
          "flagged_labels": flagged,
          "rates": rates,
          "reports": dict(reports)}


# ------------------------------------------------------------------ writers


def _json_safe(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()
            if k not in _DROPPED and not isinstance(v, np.ndarray)}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, np.ndarray):
    return None
  return x


def write_json(path: str, combined: Mapping[str, Any]) -> None:
  """`audit.json`: `combined` without arrays or per-identity data; NaN/inf become null."""
  with open(path, "w") as f:
    json.dump(_json_safe(combined), f, indent=2, allow_nan=False)


def write_identities_csv(path: str, reports: Mapping[str, Mapping[str, Any]],
                         rows: Mapping[Any, int] | None = None) -> None:
  """`audit_identities.csv`: one line per generated identity.

  Columns: label, row (the stage-1 row the label came from, from `rows`, else empty), then per
  encoder `<enc>_nearest_real_label`, `<enc>_class_cosine`, `<enc>_image_mean_top1`,
  `<enc>_flagged` (0/1), and `flagged` (1 if any encoder flags it).
  """
  if not reports:
    raise ValueError("write_identities_csv: no encoder reports.")
  per = {enc: r["per_identity"]["generated"] for enc, r in reports.items()}
  labels = next(iter(per.values()))["label"]
  for enc, p in per.items():
    if not np.array_equal(p["label"], labels):
      raise ValueError(f"write_identities_csv: encoder {enc!r} audited other identities; "
                       "embed the same generated set with every encoder.")
  header = ["label", "row"]
  for enc in per:
    header += [f"{enc}_{c}" for c in ("nearest_real_label", "class_cosine", "image_mean_top1",
                                      "flagged")]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header + ["flagged"])
    for k, lab in enumerate(labels):
      lab = lab.item() if hasattr(lab, "item") else lab
      line = [lab, "" if rows is None or lab not in rows else int(rows[lab])]
      for p in per.values():
        line += [p["nearest_label"][k].item(), f"{float(p['class_cosine'][k]):.6f}",
                 f"{float(p['image_mean_top1'][k]):.6f}", int(p["flagged"][k])]
      w.writerow(line + [int(any(p["flagged"][k] for p in per.values()))])


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def write_histograms(path: str, reports: Mapping[str, Mapping[str, Any]]) -> None:
  """`audit_hist.png`: per encoder, C and I distributions (densities) of generated, held-out B,
  leak and (C) training nearest-other identities, with τ_C / τ_I and, on I, the impostor
  threshold at the verdict FMR marked."""
  plt = _pyplot()
  if not reports:
    raise ValueError("write_histograms: no encoder reports.")
  names = {"generated": "generated", "heldout_b": "held-out B (unrelated real)",
           "leak": "leak control", "training_nearest_other": "training: nearest other id"}
  fig, axes = plt.subplots(len(reports), 2, figsize=(12, 3.6 * len(reports)), squeeze=False)
  for row, (enc, r) in enumerate(reports.items()):
    edges = np.asarray(r["histograms"]["edges"])
    for col, (key, tau, title) in enumerate((
        ("class", r["thresholds"]["class"], "class statistic C: max centre cosine"),
        ("image", r["thresholds"]["image"], "image statistic I: mean top-1 image cosine"))):
      ax, used = axes[row, col], [tau]
      for s, label in names.items():
        counts = np.asarray(r["histograms"][key].get(s, []), np.float64)
        if counts.size and counts.sum() > 0:
          ax.stairs(counts / (counts.sum() * np.diff(edges)), edges, label=label)
          used += [edges[counts.nonzero()[0][0]], edges[counts.nonzero()[0][-1] + 1]]
      ax.axvline(tau, color="k", linestyle="--", label=f"τ = {tau:.3f}")
      if key == "image":
        t = r["tests"]["image_fraction"]
        ax.axvline(t["threshold"], color="grey", linestyle=":",
                   label=f"impostor FMR {t['fmr']:g}: {t['threshold']:.3f}")
      ax.set_xlim(max(-1.0, min(used) - 0.05), min(1.0, max(used) + 0.05))
      ax.set_title(f"{enc}: {title}")
      ax.set_xlabel("cosine")
      ax.set_ylabel("density")
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _check_image(img: Any, what: str) -> np.ndarray:
  img = np.asarray(img)
  if img.shape != (112, 112, 3) or img.dtype != np.uint8:
    raise ValueError(f"write_closest: {what} returned {img.dtype} {img.shape}; it must return "
                     "a uint8 [112, 112, 3] RGB image.")
  return img


def write_closest(path: str, pairs: Sequence[tuple[int, int, float]],
                  get_generated_image: Callable[[int], np.ndarray],
                  get_training_image: Callable[[int], np.ndarray], n: int = 16) -> None:
  """`audit_closest.png`: the `n` closest generated↔training pairs side by side with cosines.

  Args:
    path: output PNG.
    pairs: `(generated row, training row, cosine)`, closest first (`closest_pairs`).
    get_generated_image: generated row -> uint8 `[112, 112, 3]`.
    get_training_image: training row -> uint8 `[112, 112, 3]`.
    n: pairs shown (the first n of `pairs`).
  """
  plt = _pyplot()
  pairs = list(pairs)[:n]
  if not pairs:
    raise ValueError("write_closest: no pairs; pass closest_pairs(report).")
  per_row = 4
  rows = -(-len(pairs) // per_row)
  fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 1.9 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for k, (g_row, t_row, cos) in enumerate(pairs):
    gen = _check_image(get_generated_image(int(g_row)), f"get_generated_image({g_row})")
    real = _check_image(get_training_image(int(t_row)), f"get_training_image({t_row})")
    ax = axes[k // per_row, k % per_row]
    ax.imshow(np.concatenate([gen, np.full((112, 4, 3), 255, np.uint8), real], axis=1))
    ax.set_title(f"gen {g_row} | train {t_row}: cos {cos:.3f}", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
