"""Reads PyTorch `torch.save` checkpoints into numpy arrays without importing torch.

`load_state_dict(path)` understands the zip format written by `torch.save` since
PyTorch 1.6 (`<name>/data.pkl`, one `<name>/data/<key>` record per storage and
an optional `<name>/byteorder`). The pickle is read by a restricted unpickler
that only resolves the globals a state_dict needs (`collections.OrderedDict`,
the `torch._utils._rebuild_*` tensor constructors and the `torch.*Storage`
types); any other global (`os.system`, `builtins.eval`, arbitrary classes) is
refused with a `ValueError` before anything runs, so an untrusted checkpoint
cannot execute code. Nor can it exhaust memory: each record's size is checked in the
zip's directory before it is read (a storage record must hold exactly the bytes its
tensor declares; a compressed record may not inflate past `MAX_INFLATION` times).

What comes back is a flat `{key: np.ndarray}` dict:

* a top-level dict of tensors is returned as is; a checkpoint that wraps it
  (`{"state_dict": {...}}`, `{"model": {...}}`, arcface_torch's
  `{"state_dict_backbone": {...}}`, ...) is unwrapped, see `WRAPPER_KEYS`;
* a `module.` prefix on every key (`nn.DataParallel` /
  `DistributedDataParallel` checkpoints) is stripped;
* tensors keep their dtype (bfloat16 via `ml_dtypes`); strided views
  (transposed, sliced, sharing a storage) are materialised as contiguous
  copies, exactly what `torch.load(...)[key].contiguous().numpy()` gives.

The legacy (pre-1.6, non-zip) format is not supported: re-save such a file
with `torch.save(torch.load(path), path)` under torch >= 1.6.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import io
import os
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

# `torch.<Name>Storage` -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# Keys under which checkpoints commonly nest the model's state_dict, tried in order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "state_dict_backbone", "model", "backbone",
                "net")

_MODULE_PREFIX = "module."


class _StorageType:
  """Stands in for a `torch.*Storage` class; the unpickler keeps its dtype by identity."""


class _TensorType:
  """Stands in for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
    raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride} "
                                 f"offset={storage_offset}")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset "
                                 f"{storage_offset} exceeds its storage of {storage.size} "
                                 "elements")
  base = storage[storage_offset:]
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      base, shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  if func not in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter,
                  _rebuild_parameter_with_state):
    raise pickle.UnpicklingError(f"_rebuild_from_type_v2 of {func!r} is not allowed")
  return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS` and storage types; loads storages from the zip."""

  def __init__(self, data: bytes, path: str, archive: zipfile.ZipFile, prefix: str,
               byteorder: str):
    super().__init__(io.BytesIO(data))
    self._path = path
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}
    # id -> (marker, dtype): a storage type's dtype never depends on pickled attributes.
    self._storage_types: dict[int, tuple[_StorageType, np.dtype]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in STORAGE_DTYPES:
      marker = _StorageType()
      self._storage_types[id(marker)] = (marker, np.dtype(STORAGE_DTYPES[name]))
      return marker
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise ValueError(f"{self._path}: refusing to load global '{module}.{name}' from the "
                     "checkpoint's pickle (only tensors and dicts of tensors are allowed)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    known = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
    if known:
      marker, dtype = self._storage_types.get(id(pid[1]), (None, None))
      known = marker is pid[1] and isinstance(pid[2], str) and isinstance(pid[4], int)
    if not known:
      raise ValueError(f"{self._path}: unsupported persistent id {pid!r} in the pickle "
                       "(only typed tensor storages are allowed)")
    _, _, key, _, numel = pid
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      # Sizes are checked against the zip's directory before anything is read or inflated.
      raw = read_record(self._archive, record, self._path, numel * dtype.itemsize,
                        f"expected {numel} x {dtype.itemsize}")
      stored = dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      self._storages[key] = np.frombuffer(raw, dtype=stored).astype(dtype, copy=False)
    return self._storages[key]


# torch.save stores its records uncompressed; a compressed record inflating past this many
# times its compressed size (a zip bomb) is refused before it is read.
MAX_INFLATION = 100


def read_record(archive: zipfile.ZipFile, name: str, path: str, expected: int | None = None,
                what: str = "") -> bytes:
  """Record `name` of `archive`, after checking its declared size (`expected` bytes, if
  given) and its compression ratio in the zip's directory: memory is bounded by the file."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise ValueError(f"{path}: storage record {name!r} is missing") from None
  if expected is not None and info.file_size != expected:
    raise ValueError(f"{path}: storage record {name!r} has {info.file_size} bytes, {what}")
  if (info.compress_type != zipfile.ZIP_STORED
      and info.file_size > MAX_INFLATION * max(info.compress_size, 1)):
    raise ValueError(f"{path}: record {name!r} would inflate {info.compress_size} compressed "
                     f"bytes to {info.file_size} (over {MAX_INFLATION}x): refusing a possible "
                     "zip bomb (torch.save stores records uncompressed)")
  return archive.read(name)  # zipfile itself checks the length and CRC as it reads


def _read_pickle(path: str) -> Any:
  """Unpickles `path` (zip format) with the restricted unpickler."""
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise ValueError(f"{path}: legacy (non-zip) torch.save format is not supported; "
                       "re-save with torch>=1.6 zip format: "
                       "torch.save(torch.load(path), path)")
    raise ValueError(f"{path}: not a PyTorch checkpoint (zip archive expected), or the file "
                     "is truncated/corrupt")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist()
                 if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise ValueError(f"{path}: expected one '<name>/data.pkl' record in the zip, "
                         f"found {pickles or 'none'}; is it a torch.save file?")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = "little"
      if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
        if byteorder not in ("little", "big"):
          raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
      unpickler = _RestrictedUnpickler(read_record(archive, pickles[0], path), path, archive,
                                       prefix, byteorder)
      return unpickler.load()
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, pickle.UnpicklingError) as e:
    raise ValueError(f"{path}: truncated or corrupt PyTorch checkpoint ({e})") from None
  except (TypeError, AttributeError, IndexError, KeyError) as e:
    raise ValueError(f"{path}: malformed PyTorch checkpoint pickle ({e!r})") from None


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
  if _is_tensor_dict(obj):
    return dict(obj)
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if _is_tensor_dict(obj.get(key)):
        return dict(obj[key])
    keys = [k for k in obj if isinstance(k, str)][:20]
    raise ValueError(f"{path}: no state_dict of tensors found; top-level keys {keys} "
                     f"(looked for a dict of tensors at the top or under {list(WRAPPER_KEYS)})")
  raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, expected a "
                   "state_dict (dict of tensors)")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a `torch.save` state_dict as numpy arrays, without torch and without running code.

  Args:
    path: a file written by `torch.save` (zip format, torch >= 1.6) holding a
      state_dict or a dict wrapping one under a `WRAPPER_KEYS` key.

  Returns:
    `{key: np.ndarray}` in PyTorch layout and dtype; a `module.` prefix shared
    by every key (DataParallel/DDP) is stripped.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming `path`, for a refused pickle global, the legacy format,
      a truncated/corrupt file or a checkpoint without a state_dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  state = _unwrap(_read_pickle(path), path)
  if all(k.startswith(_MODULE_PREFIX) for k in state):
    state = {k[len(_MODULE_PREFIX):]: v for k, v in state.items()}
  return state
