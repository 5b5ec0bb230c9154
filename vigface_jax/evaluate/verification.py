"""1:1 verification on insightface `.bin` packs (LFW, CFP-FP, AgeDB-30, ...), DESIGN §2.

A pack is a pickle of `(bins, issame_list)`: `bins` holds 2N encoded 112×112 images (pair i is
items 2i and 2i+1) as Python-2 `str`, Python-3 `bytes` or uint8 numpy arrays of encoded bytes;
`issame_list` holds N bools. Packs come from the internet, and unpickling runs whatever the file
asks for, so `load_bin` never calls `pickle.load` unrestricted: `_PackUnpickler` resolves only
the handful of numpy reconstruction functions such files contain, each replaced by a checked
wrapper that builds plain numeric arrays and nothing else (see `_SAFE_GLOBALS`).

The metric is insightface's `recognition/eval/verification.py` protocol, reproduced number for
number: flip-summed embeddings, L2-normalised (as `sklearn.preprocessing.normalize`), squared
Euclidean distance, 10 folds without shuffling (`sklearn.model_selection.KFold` splits), the
threshold chosen on the training folds from `arange(0, 4, 0.01)` by accuracy, mean ± std of the
test-fold accuracies; VAL@FAR with the threshold interpolated on `arange(0, 4, 0.001)` exactly as
insightface's `calculate_val` does under scipy <= 1.8 (newer scipy makes that code raise; see
`_slinear_scipy18`). sklearn is not needed.

Typical use:

  embed = vigface_jax.evaluate.embed.load_embedder(checkpoint_dir)
  metrics = verify(embed, "/data/faces_webface_112x112/lfw.bin")
  metrics["accuracy_mean"], metrics["accuracy_std"], metrics["val"]
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image
from scipy import interpolate

from vigface_jax import ops
from vigface_jax.data import codec

IMAGE_SIZE = 112
# Formats PIL may try when decoding pack items: limiting the set keeps rarely used (and
# rarely hardened) PIL decoders away from untrusted bytes. insightface packs are JPEG.
_DECODE_FORMATS = ("JPEG", "PNG", "BMP")
# Numeric kinds an array in a pack may have: bool, signed, unsigned, float.
_NUMERIC_KINDS = "biuf"

PathLike = str | os.PathLike


class UnsafePickleError(ValueError):
  """A `.bin` file asked the unpickler for something a verification pack never contains."""


# ---------------------------------------------------------------------------------------------
# Safe unpickling.


def _canonical_dtype(dtype: Any) -> np.dtype:
  """Returns a fresh plain numeric dtype equal to `dtype`, or raises `UnsafePickleError`.

  A pickle can rewrite a dtype after building it (`BUILD` calls `dtype.__setstate__`, which can
  add fields or set the has-object flag), so a dtype is checked where it is *used*, and the
  array is built from a freshly constructed copy rather than from the pickled object.
  """
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f"expected a numpy dtype, got {type(dtype).__name__}")
  if (dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None
      or dtype.kind not in _NUMERIC_KINDS):
    raise UnsafePickleError(f"refused numpy dtype {dtype!r}: only plain numeric dtypes are "
                            "allowed (object and structured dtypes are not)")
  canonical = np.dtype(dtype.str)
  if canonical.itemsize != dtype.itemsize:
    raise UnsafePickleError(f"refused inconsistent numpy dtype {dtype!r}")
  return canonical


def _as_text(value: Any) -> Any:
  # Python-2 pickles loaded with encoding='bytes' turn every `str` argument into bytes.
  return value.decode("latin1") if isinstance(value, bytes) else value


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
  """Stands in for `numpy.dtype(spec, align, copy)` during unpickling."""
  spec = _as_text(spec)
  if not isinstance(spec, str):
    raise UnsafePickleError(f"refused numpy.dtype({type(spec).__name__}): only type strings")
  dtype = np.dtype(spec, bool(align), bool(copy))
  _canonical_dtype(dtype)
  return dtype


class _GuardedArray(np.ndarray):
  """The array type `_reconstruct` makes: its `__setstate__` only accepts raw numeric bytes."""

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise UnsafePickleError("refused malformed ndarray state")
    head, (shape, dtype, is_fortran, raw) = state[:-4], state[-4:]
    dtype = _canonical_dtype(dtype)
    # Object arrays pickle their items as a list; numeric arrays as one bytes string.
    if not isinstance(raw, (bytes, bytearray)):
      raise UnsafePickleError(f"refused ndarray data of type {type(raw).__name__}")
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
      raise UnsafePickleError(f"refused ndarray shape {shape!r}")
    super().__setstate__(head + (shape, dtype, bool(is_fortran), bytes(raw)))


class _NdarrayToken:
  """What `numpy.ndarray` resolves to: usable only as `_reconstruct`'s first argument."""


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """Stands in for `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`."""
  if subtype is not _NdarrayToken:
    raise UnsafePickleError("refused _reconstruct of a type other than numpy.ndarray")
  if tuple(shape) != (0,):
    raise UnsafePickleError(f"refused _reconstruct with shape {shape!r} (numpy writes (0,))")
  dtype = _canonical_dtype(np.dtype(_as_text(dtype)))
  return np.ndarray.__new__(_GuardedArray, (0,), dtype)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """Stands in for `numpy.core.numeric._frombuffer` (pickle protocol 5 arrays)."""
  dtype = _canonical_dtype(dtype)
  if not isinstance(buf, (bytes, bytearray)):
    raise UnsafePickleError(f"refused array buffer of type {type(buf).__name__}")
  order = _as_text(order)
  if order not in ("C", "F"):
    raise UnsafePickleError(f"refused array order {order!r}")
  return np.frombuffer(bytes(buf), dtype=dtype).reshape(tuple(shape), order=order)


def _safe_scalar(dtype: Any, data: Any = None) -> np.generic:
  """Stands in for `numpy.core.multiarray.scalar` (e.g. a `numpy.bool_` in `issame_list`)."""
  dtype = _canonical_dtype(dtype)
  if isinstance(data, str):  # protocol 0-2 pickles store the raw bytes as latin-1 text
    data = data.encode("latin1")
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise UnsafePickleError("refused numpy scalar without exactly one item of raw bytes")
  return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
  """Stands in for `_codecs.encode`: Python 3 pickles bytes this way below protocol 3."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError("refused _codecs.encode other than (str, 'latin1')")
  return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_codecs_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x, 2.x
  _SAFE_GLOBALS[(_module, "_reconstruct")] = _safe_reconstruct
  _SAFE_GLOBALS[(_module, "scalar")] = _safe_scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
  _SAFE_GLOBALS[(_module, "_frombuffer")] = _safe_frombuffer
del _module


class _PackUnpickler(pickle.Unpickler):
  """An unpickler that can build lists, tuples, bytes, bools and numeric numpy arrays only."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refused to load global '{module}.{name}'; this file is not a verification pack "
          "(they hold only bytes, bools and numpy arrays). Nothing in it was executed."
      ) from None

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError("refused a persistent id; this file is not a verification pack")


def _open_for_read(path: PathLike):
  path_str = os.fspath(path)
  if "://" in path_str:  # gs://... and other remote paths (DESIGN §2: data may sit in a bucket)
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path_str).open("rb")
  return open(path_str, "rb")


def _to_encoded_bytes(item: Any, path: str, index: int) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if (isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype.itemsize == 1
      and item.dtype.kind in "iu"):
    return item.tobytes()
  raise ValueError(f"{path}: item {index} of the image list is a {type(item).__name__}"
                   f"{getattr(item, 'shape', '')}, expected encoded image bytes or a 1-D uint8 "
                   "array of them")


def _to_issame(issame: Any, path: str) -> np.ndarray:
  if isinstance(issame, np.ndarray):
    values = issame.ravel().tolist() if issame.ndim == 1 else None
  elif isinstance(issame, (list, tuple)):
    values = list(issame)
  else:
    values = None
  if values is None or not all(isinstance(v, (bool, int, np.bool_, np.integer))
                               and v in (0, 1) for v in values):
    raise ValueError(f"{path}: the second element of a verification pack must be a list of "
                     f"bools (issame); got {type(issame).__name__}")
  return np.asarray([bool(v) for v in values], dtype=bool)


def _decode(data: bytes, path: str, index: int) -> np.ndarray:
  """Decodes one pack item to uint8 `[112, 112, 3]` RGB."""
  try:
    with Image.open(io.BytesIO(data), formats=_DECODE_FORMATS) as img:
      # Checked before decoding: a huge declared size would otherwise be decoded first.
      size = img.size
      if size == (IMAGE_SIZE, IMAGE_SIZE):
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: image {index} ({len(data)} bytes) could not be decoded as "
                     f"{'/'.join(_DECODE_FORMATS)}: {e}") from e
  if size != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f"{path}: image {index} is {size[0]}x{size[1]}, expected "
                     f"{IMAGE_SIZE}x{IMAGE_SIZE} (verification packs hold aligned 112x112 "
                     "crops; re-align the images or rebuild the pack)")
  return array


def load_bin(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads an insightface verification pack without executing anything in it.

  Args:
    path: a `.bin` file (str or os.PathLike; `scheme://` paths go through etils.epath).

  Returns:
    `(images, issame)`: uint8 `[2 * num_pairs, 112, 112, 3]` RGB images, pair i being rows
    2i and 2i+1, and bool `[num_pairs]`.

  Raises:
    UnsafePickleError: the pickle asks for anything but lists, tuples, bytes, bools and plain
      numeric numpy arrays (e.g. a callable): the file is refused before anything runs.
    ValueError: the file is truncated or corrupt, is not a `(bins, issame_list)` pair with
      `len(bins) == 2 * len(issame_list)`, or an image cannot be decoded or is not 112x112.
    OSError: the file cannot be opened.
  """
  name = os.fspath(path)
  with _open_for_read(path) as f:
    try:
      # encoding='bytes': Python-2 packs store images as `str`, which must stay raw bytes.
      obj = _PackUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as e:
      raise UnsafePickleError(f"{name}: {e}") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, OverflowError) as e:
      raise ValueError(f"{name}: truncated or corrupt verification pack "
                       f"({type(e).__name__}: {e})") from e
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise ValueError(f"{name}: a verification pack is a pickled 2-tuple (bins, issame_list); "
                     f"got {type(obj).__name__}"
                     f"{f' of length {len(obj)}' if isinstance(obj, (tuple, list)) else ''}")
  bins, issame = obj
  if not isinstance(bins, (list, tuple)):
    raise ValueError(f"{name}: the first element of a verification pack must be a list of "
                     f"encoded images; got {type(bins).__name__}")
  issame = _to_issame(issame, name)
  if len(bins) != 2 * len(issame):
    raise ValueError(f"{name}: {len(bins)} images for {len(issame)} pairs; a verification pack "
                     "holds exactly two images per pair")
  # The whole structure is checked before the (slow) decoding starts.
  encoded = [_to_encoded_bytes(item, name, i) for i, item in enumerate(bins)]
  images = np.empty((len(encoded), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i, data in enumerate(encoded):
    images[i] = _decode(data, name, i)
  logging.info("Loaded %s: %d pairs (%d same).", name, len(issame), int(issame.sum()))
  return images, issame


# ---------------------------------------------------------------------------------------------
# Writing.


def write_bin(path: PathLike, images: np.ndarray, issame: Sequence[bool] | np.ndarray, *,
              image_format: str = "jpeg", quality: int = 95) -> None:
  """Writes a verification pack in insightface's format, atomically.

  The file is `pickle.dump((list_of_encoded_bytes, list_of_bool), f, HIGHEST_PROTOCOL)`, as
  insightface's own pack scripts write it, so insightface tools read it too. A local file is
  written to a temporary file beside it and renamed over `path`, so readers never see a
  half-written pack and a failure leaves any existing file intact.

  Args:
    path: destination (str or os.PathLike; `scheme://` paths go through etils.epath).
    images: uint8 `[2 * num_pairs, 112, 112, 3]` RGB; pair i is rows 2i and 2i+1.
    issame: bool `[num_pairs]`.
    image_format: "jpeg" (lossy, as insightface packs) or "png" (lossless).
    quality: JPEG quality, 1..100.

  Raises:
    ValueError: bad shapes, dtypes, format or quality.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (
      IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f"write_bin({os.fspath(path)}): images must be uint8 [2N, {IMAGE_SIZE}, "
                     f"{IMAGE_SIZE}, 3]; got {images.dtype} {list(images.shape)}")
  issame = np.asarray(issame)
  if issame.ndim != 1 or not (issame.dtype == bool or (
      np.issubdtype(issame.dtype, np.integer) and np.isin(issame, (0, 1)).all())):
    raise ValueError(f"write_bin({os.fspath(path)}): issame must be a 1-D bool array; got "
                     f"{issame.dtype} {list(issame.shape)}")
  if images.shape[0] != 2 * issame.shape[0]:
    raise ValueError(f"write_bin({os.fspath(path)}): {images.shape[0]} images for "
                     f"{issame.shape[0]} pairs; need exactly two images per pair")
  fmt = image_format.upper().replace("JPG", "JPEG")
  if fmt not in ("JPEG", "PNG"):
    raise ValueError(f"write_bin: image_format must be 'jpeg' or 'png'; got {image_format!r}")
  if not (isinstance(quality, int) and 1 <= quality <= 100):
    raise ValueError(f"write_bin: quality must be an int in 1..100; got {quality!r}")

  bins = [codec.encode_image(image, fmt, quality) for image in images]
  payload = pickle.dumps((bins, [bool(x) for x in issame]), protocol=pickle.HIGHEST_PROTOCOL)
  path_str = os.fspath(path)
  if "://" in path_str:
    from etils import epath  # pylint: disable=g-import-not-at-top
    # Object stores publish an object only once its upload completes: already atomic.
    epath.Path(path_str).write_bytes(payload)
  else:
    directory = os.path.dirname(os.path.abspath(path_str))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path_str)}.",
                               suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())  # the rename must not become visible before the data
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a pack is an ordinary shared file
      os.replace(tmp, path_str)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
  logging.info("Wrote %s: %d pairs, %s.", path_str, issame.shape[0], fmt)


# ---------------------------------------------------------------------------------------------
# The metric (insightface recognition/eval/verification.py).


def kfold_splits(num_samples: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """`(train, test)` index arrays exactly as `sklearn KFold(num_folds, shuffle=False)`.

  Fold sizes are `num_samples // num_folds`, the first `num_samples % num_folds` folds one
  larger, test folds contiguous and in order. `num_folds == 1` gives train == test == all, as
  insightface's `LFold` does.
  """
  indices = np.arange(num_samples)
  if num_folds == 1:
    return [(indices, indices)]
  sizes = np.full(num_folds, num_samples // num_folds, dtype=int)
  sizes[:num_samples % num_folds] += 1
  splits, start = [], 0
  for size in sizes:
    test = indices[start:start + size]
    train = np.concatenate([indices[:start], indices[start + size:]])
    splits.append((train, test))
    start += size
  return splits


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  # sklearn.preprocessing.normalize(x): einsum row norms; (near-)zero norms left as 1.
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))
  norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
  return x / norms[:, np.newaxis]


def _less_counts(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  # `np.sum(values < t)` for every t at once (searchsorted 'left' counts strictly smaller).
  return np.searchsorted(sorted_values, thresholds, side="left")


def _roc_fold(thresholds, dist_train, same_train, dist_test, same_test):
  """insightface `calculate_roc`, one fold: (tprs, fprs, accuracy, best threshold)."""

  def counts(dist, same):
    tp = _less_counts(np.sort(dist[same]), thresholds)
    fp = _less_counts(np.sort(dist[~same]), thresholds)
    return tp, fp, int(same.sum()) - tp, int((~same).sum()) - fp  # tp, fp, fn, tn

  tp, _, _, tn = counts(dist_train, same_train)
  acc_train = (tp + tn).astype(np.float64) / dist_train.size
  best = int(np.argmax(acc_train))  # first maximum, as np.argmax in insightface
  tp, fp, fn, tn = counts(dist_test, same_test)
  # `0 if tp + fn == 0 else tp / (tp + fn)`, in float64 as the reference's Python floats.
  tprs = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
  fprs = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
  accuracy = float(tp[best] + tn[best]) / dist_test.size
  return tprs, fprs, accuracy, float(thresholds[best])


def _slinear_scipy18(x: np.ndarray, y: np.ndarray, x_new: float) -> np.ndarray:
  """`scipy.interpolate.interp1d(x, y, kind='slinear')(x_new)` as scipy <= 1.8 computed it.

  insightface's `calculate_val` interpolates the threshold over FAR values that always repeat
  (FAR stays 0 over the low thresholds); scipy >= 1.9 refuses repeated x there ("Expect x to
  not have duplicates", deepinsight/insightface#2152), so the published numbers come from the
  old code path, rebuilt here: a stable sort, then the degree-1 B-spline with knots
  `[x[0], x..., x[-1]]` and coefficients y that `make_interp_spline(x, y, k=1)` returned.
  Evaluating the same B-spline keeps even its rounding.
  """
  order = np.argsort(x, kind="mergesort")
  x, y = x[order], y[order]
  spline = interpolate.BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)
  return spline(x_new)


def _val_far(threshold, dist, same):
  """insightface `calculate_val_far` (which divides by zero on a one-class fold: here 0)."""
  predict = np.less(dist, threshold)
  n_same, n_diff = int(same.sum()), int((~same).sum())
  true_accept = int(np.sum(predict & same))
  false_accept = int(np.sum(predict & ~same))
  val = float(true_accept) / float(n_same) if n_same else 0.0
  far = float(false_accept) / float(n_diff) if n_diff else 0.0
  return val, far


def evaluate(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, nrof_folds: int = 10,
             far_target: float = 1e-3) -> dict[str, Any]:
  """insightface's verification protocol on flip-summed embeddings.

  Args:
    embeddings: float `[2 * num_pairs, dim]`, pair i being rows 2i and 2i+1. Normalised here
      (L2, as `sklearn.preprocessing.normalize`), so raw flip sums or normalised ones both work.
      float32 stays float32, as in insightface, so the distances are the ones it computes.
    issame: bool `[num_pairs]`.
    nrof_folds: number of contiguous, unshuffled folds (1 <= nrof_folds <= num_pairs).
    far_target: false accept rate at which VAL is reported.

  Returns:
    A JSON-serialisable dict: `accuracy_mean`, `accuracy_std` (np.std over folds, as insightface
    reports), `accuracies` and `best_thresholds` (per fold), `val`, `val_std`, `far` (mean
    over folds), `far_target`, `tpr`, `fpr` (mean ROC over folds at thresholds
    `arange(0, 4, 0.01)`), `num_pairs`, `nrof_folds`.

  Raises:
    ValueError: wrong shapes, non-finite embeddings or bad fold count.
  """
  emb = np.asarray(embeddings)
  if emb.dtype != np.float64:
    try:  # float32 like insightface's embeddings; bfloat16/float16/int inputs widen to it
      emb = emb.astype(np.float32)
    except (TypeError, ValueError) as e:
      raise ValueError(f"evaluate: embeddings must be numeric; got {emb.dtype}") from e
  same = np.asarray(issame)
  if emb.ndim != 2 or emb.shape[0] % 2 or emb.shape[0] == 0:
    raise ValueError(f"evaluate: embeddings must be [2 * num_pairs, dim]; got {list(emb.shape)}")
  if same.ndim != 1 or not (same.dtype == bool or np.issubdtype(same.dtype, np.integer)):
    raise ValueError(f"evaluate: issame must be a 1-D bool array; got {same.dtype} "
                     f"{list(same.shape)}")
  num_pairs = emb.shape[0] // 2
  if same.shape[0] != num_pairs:
    raise ValueError(f"evaluate: {emb.shape[0]} embeddings make {num_pairs} pairs but issame "
                     f"has {same.shape[0]} entries")
  if not np.isfinite(emb).all():
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    raise ValueError(f"evaluate: {bad.size} embeddings are not finite (first rows: "
                     f"{bad[:5].tolist()}); check the model or checkpoint")
  if not (isinstance(nrof_folds, (int, np.integer)) and 1 <= nrof_folds <= num_pairs):
    raise ValueError(f"evaluate: nrof_folds must be an int in 1..{num_pairs}; got {nrof_folds!r}")
  if not 0.0 < far_target <= 1.0:
    raise ValueError(f"evaluate: far_target must be in (0, 1]; got {far_target!r}")
  same = same.astype(bool)

  emb = _l2_normalize(emb)
  dist = np.sum(np.square(np.subtract(emb[0::2], emb[1::2])), 1)
  # Thresholds are float64, so the reference compares in float64: widening float32 is exact.
  dist = dist.astype(np.float64)
  splits = kfold_splits(num_pairs, int(nrof_folds))

  roc_thresholds = np.arange(0, 4, 0.01)
  tprs, fprs, accuracies, best_thresholds = [], [], [], []
  for train, test in splits:
    tpr, fpr, acc, best = _roc_fold(roc_thresholds, dist[train], same[train], dist[test],
                                    same[test])
    tprs.append(tpr)
    fprs.append(fpr)
    accuracies.append(acc)
    best_thresholds.append(best)

  # insightface evaluates VAL on a 10x finer grid than accuracy.
  val_thresholds = np.arange(0, 4, 0.001)
  vals, fars = [], []
  for train, test in splits:
    same_train = same[train]
    n_diff = int((~same_train).sum())
    false_accepts = _less_counts(np.sort(dist[train][~same_train]), val_thresholds)
    far_train = false_accepts / n_diff if n_diff else np.zeros(len(val_thresholds))
    if np.max(far_train) >= far_target:
      threshold = _slinear_scipy18(far_train, val_thresholds, far_target)
    else:
      threshold = 0.0
    if same[test].all() or not same[test].any():
      logging.warning("A verification test fold has only one class; its VAL or FAR is 0.")
    val, far = _val_far(threshold, dist[test], same[test])
    vals.append(val)
    fars.append(far)

  return {
      "accuracy_mean": float(np.mean(accuracies)),
      "accuracy_std": float(np.std(accuracies)),
      "accuracies": [float(a) for a in accuracies],
      "best_thresholds": best_thresholds,
      "val": float(np.mean(vals)),
      "val_std": float(np.std(vals)),
      "far": float(np.mean(fars)),
      "far_target": float(far_target),
      "tpr": np.mean(np.stack(tprs), 0).tolist(),
      "fpr": np.mean(np.stack(fprs), 0).tolist(),
      "num_pairs": int(num_pairs),
      "nrof_folds": int(nrof_folds),
  }


# ---------------------------------------------------------------------------------------------
# Embedding and the one-call convenience.

EmbedFn = Callable[[np.ndarray], Any]


def flip_sum_embeddings(embed_fn: EmbedFn, images: np.ndarray, batch_size: int = 256, *,
                        progress: bool = False) -> np.ndarray:
  """`embed_fn(x) + embed_fn(flip(x))` for every image, batched; not normalised.

  Every call gets exactly `min(batch_size, len(images))` images (the last batch is padded
  with zeros and the padding dropped) so a jitted `embed_fn` compiles once.

  Args:
    embed_fn: uint8 `[batch, 112, 112, 3]` RGB → float `[batch, dim]`.
    images: uint8 `[num_images, height, width, 3]`.
    batch_size: images per call.
    progress: show a tqdm progress bar.

  Returns:
    float32 `[num_images, dim]`.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"flip_sum_embeddings: images must be uint8 [num_images, height, width, "
                     f"3]; got {images.dtype} {list(images.shape)}")
  if not (isinstance(batch_size, int) and batch_size > 0):
    raise ValueError(f"flip_sum_embeddings: batch_size must be a positive int; got {batch_size}")
  num = images.shape[0]
  if num == 0:
    raise ValueError("flip_sum_embeddings: no images")
  size = min(batch_size, num)
  starts = range(0, num, size)
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm.tqdm(starts, desc="embedding", unit="batch")
  out = None
  for start in starts:
    batch, n = ops.pad_batch(images[start:start + size], size)
    pieces = []
    for x in (batch, np.ascontiguousarray(batch[:, :, ::-1])):  # width axis: horizontal flip
      y = np.asarray(embed_fn(x), dtype=np.float32)
      if y.ndim != 2 or y.shape[0] != size:
        raise ValueError(f"flip_sum_embeddings: embed_fn returned shape {list(y.shape)} for "
                         f"{size} images; expected [{size}, dim]")
      pieces.append(y[:n])
    if out is None:
      out = np.empty((num, pieces[0].shape[1]), np.float32)
    out[start:start + n] = pieces[0] + pieces[1]
  return out


def verify(embed_fn: EmbedFn, bin_path: PathLike, batch_size: int = 256, *,
           nrof_folds: int = 10, far_target: float = 1e-3,
           progress: bool = False) -> dict[str, Any]:
  """`load_bin` → `flip_sum_embeddings` → `evaluate` on one pack; see those for details.

  Returns:
    `evaluate`'s dict.
  """
  images, issame = load_bin(bin_path)
  embeddings = flip_sum_embeddings(embed_fn, images, batch_size, progress=progress)
  metrics = evaluate(embeddings, issame, nrof_folds=nrof_folds, far_target=far_target)
  logging.info("%s: accuracy %.5f ± %.5f, VAL %.5f ± %.5f @ FAR %.5f", os.fspath(bin_path),
               metrics["accuracy_mean"], metrics["accuracy_std"], metrics["val"],
               metrics["val_std"], metrics["far"])
  return metrics
