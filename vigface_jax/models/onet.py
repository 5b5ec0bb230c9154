"""MTCNN's O-Net in Flax NNX: five-point landmarks for faces that come without them.

O-Net is the third, 48x48 stage of MTCNN (Zhang et al., 2016). Given a crop
that already holds one roughly centred face it returns a face probability, a
box regression and five landmark points. This port reproduces the network of
the `facenet-pytorch` package (`facenet_pytorch/models/mtcnn.py::ONet`) and
loads the weights that package ships as `facenet_pytorch/data/onet.pt` (a
PyTorch state_dict). Nothing is downloaded and no weights live in this repo:

* `load_facenet_pytorch_onet(path)` reads `onet.pt` (needs torch) or an `.npz`
  written by `save_npz` (numpy only).
* `convert_onet(pt_path, npz_path)` converts once where torch is installed,
  so inference elsewhere needs only numpy and JAX.

Conventions:

* **Input.** NHWC float `[batch, 48, 48, 3]`, RGB, normalised as MTCNN does:
  `(pixel - 127.5) * 0.0078125`. `normalize` does that; `predict_landmarks`
  and `landmarks_for_aligned_faces` take uint8 images and call it.
* **Layout.** facenet-pytorch feeds `[batch, 3, height, width]` (rows, then
  columns, no transpose) and, before the first dense layer, permutes the
  `[batch, 128, 3, 3]` features to `(0, 3, 2, 1)`, i.e. flattens in
  (column, row, channel) order. `ONet.__call__` does the same with a
  `(0, 2, 1, 3)` transpose of its NHWC features, so `dense5` keeps the
  PyTorch weight order.
* **Outputs** `(box_reg [b, 4], landmarks [b, 10], prob [b, 2])`, as in
  PyTorch: `prob[:, 1]` is the face probability (softmax in float32),
  `landmarks` holds `x` for the five points, then `y`, each as a fraction of
  the box width/height; ArcFace order (left eye, right eye, nose, left mouth,
  right mouth; "left" = smaller `x`).
* **Relative to pixels.** MTCNN (`detect_face`, third stage) maps
  `x = box_x0 + w * l[0:5]`, `y = box_y0 + h * l[5:10]` where the box holds
  the `w` columns `box_x0 ... box_x0 + w - 1` (0-based indices of the pixels
  it crops: `imgs[..., y - 1:ey, x - 1:ex]` with `box_x0 = x - 1`). So with
  pixel centres at integers, `l = 0` is the centre of the box's first pixel
  and `l = 1` one pixel past the centre of its last. `predict_landmarks`
  uses exactly this map, with the whole input crop as the box.
* **dtype.** Parameters are float32 (`param_dtype`); `dtype` is the compute
  dtype (float32 by default; the network is tiny, so there is little reason
  to change it). Convolutions and matmuls default to `Precision.HIGHEST` so
  TPU/GPU results match the float32 PyTorch reference.

Expected accuracy on real aligned faces: ~2 px mean error on
`skimage.data.astronaut()` (2.04 px over the five points in the 112x112 frame;
1.9-2.3 px when the alignment points are jittered by 1.5 px), measured against
hand-placed points mapped by the same alignment (`tests/test_onet.py`).
`landmarks_for_aligned_faces` crops the square `ALIGNED_FACE_BOX` of the
ArcFace frame, resizes it to 48x48 and maps the points back. There O-Net's
points sit on average ~1 px right of and ~0.7 px below the hand-placed ones;
feeding O-Net horizontally flipped crops shows the same ~0.013-box-width shift
in x without any hand labels, so it belongs to the network (kept: the outputs
are exactly MTCNN's). O-Net alone, without MTCNN's P-Net/R-Net, assumes a face
already roughly centred and scaled in the box, which ArcFace alignment
guarantees. On the repo's procedural faces (`data.faces`: synthetic, up to 60
degrees of yaw) the mean error is ~5.6 px: turned and cartoon-like faces are
far from O-Net's training data.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math
import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from vigface_jax.models import layers

INPUT_SIZE = 48
NUM_LANDMARKS = 5

# MTCNN's input normalisation: (pixel - 127.5) / 128.
_PIXEL_MEAN = 127.5
_PIXEL_SCALE = 0.0078125

# The facenet-pytorch state_dict: key -> shape, in PyTorch layout
# (conv [out, in, kh, kw], linear [out, in], PReLU [channels]).
STATE_DICT_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (32, 3, 3, 3),
    "conv1.bias": (32,),
    "prelu1.weight": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "prelu2.weight": (64,),
    "conv3.weight": (64, 64, 3, 3),
    "conv3.bias": (64,),
    "prelu3.weight": (64,),
    "conv4.weight": (128, 64, 2, 2),
    "conv4.bias": (128,),
    "prelu4.weight": (128,),
    "dense5.weight": (256, 1152),
    "dense5.bias": (256,),
    "prelu5.weight": (256,),
    "dense6_1.weight": (2, 256),
    "dense6_1.bias": (2,),
    "dense6_2.weight": (4, 256),
    "dense6_2.bias": (4,),
    "dense6_3.weight": (10, 256),
    "dense6_3.bias": (10,),
}

# Box of the 112x112 ArcFace frame that `landmarks_for_aligned_faces` feeds to
# O-Net, as (x0, y0, side): pixel columns x0 ... x0 + side - 1 and rows
# y0 ... y0 + side - 1. It is centred on the template horizontally (centre
# x = 55.5 vs the template's 56.0), runs from the brows to the bottom edge, and
# lies close to the fixed point of O-Net's own box regression on an aligned
# face (about (5.5, 17.5, 98)), i.e. the box O-Net expects around such a face,
# while staying inside the image. The whole frame (0, 0, 112) leaves the
# points ~2.5 px off on astronaut(); boxes of side 88-100 near this one give
# 1.9-2.2 px.
ALIGNED_FACE_BOX = (8, 16, 96)


def max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max pooling with PyTorch's `ceil_mode=True` and no padding.

  The output has `ceil((n - window) / stride) + 1` positions per spatial axis
  (minus one if the last window would start past the input, PyTorch's rule);
  windows that run past the bottom/right edge see `-inf` there, so they take
  the max of the pixels they do cover.

  Args:
    x: `[batch, height, width, channels]`.
    window: square window size.
    stride: stride along height and width.

  Returns:
    `[batch, out_height, out_width, channels]`.
  """
  pads = []
  for n in x.shape[1:3]:
    out = math.ceil((n - window) / stride) + 1
    if (out - 1) * stride >= n:
      out -= 1
    pads.append((0, max(0, (out - 1) * stride + window - n)))
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
  )


class ONet(nnx.Module):
  """MTCNN's O-Net (facenet-pytorch layout and weights).

  Input `[batch, 48, 48, 3]` normalised RGB (see `normalize`); outputs
  `(box_reg [batch, 4], landmarks [batch, 10], prob [batch, 2])` exactly as
  facenet-pytorch's `ONet.forward` returns `(b, c, a)`.
  """

  def __init__(
      self,
      *,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
      rngs: nnx.Rngs,
  ):
    """Creates a randomly initialised O-Net.

    Args:
      dtype: compute dtype of convolutions, dense layers and PReLUs; the
        softmax is always float32.
      param_dtype: dtype of all parameters (float32 to hold the converted
        weights exactly).
      precision: matmul/convolution precision; HIGHEST keeps accelerators at
        float32 accuracy.
      rngs: initialisation RNGs (irrelevant once weights are loaded).
    """
    conv = functools.partial(
        nnx.Conv, padding="VALID", dtype=dtype, param_dtype=param_dtype,
        precision=precision, rngs=rngs,
    )
    dense = functools.partial(
        nnx.Linear, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs
    )
    prelu = functools.partial(layers.PReLU, dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.conv1 = conv(3, 32, (3, 3))
    self.prelu1 = prelu(32)
    self.conv2 = conv(32, 64, (3, 3))
    self.prelu2 = prelu(64)
    self.conv3 = conv(64, 64, (3, 3))
    self.prelu3 = prelu(64)
    self.conv4 = conv(64, 128, (2, 2))
    self.prelu4 = prelu(128)
    self.dense5 = dense(1152, 256)
    self.prelu5 = prelu(256)
    self.dense6_1 = dense(256, 2)
    self.dense6_2 = dense(256, 4)
    self.dense6_3 = dense(256, 10)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs O-Net.

    Args:
      x: float `[batch, 48, 48, 3]`, RGB normalised by `normalize`.

    Returns:
      `(box_reg [batch, 4], landmarks [batch, 10], prob [batch, 2])`, float32;
      `landmarks` is `[x0..x4, y0..y4]` relative to the box.
    """
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"O-Net input must be [batch, 48, 48, 3], got {x.shape}")
    x = x.astype(self.dtype)
    x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)  # [b, 23, 23, 32]
    x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)  # [b, 10, 10, 64]
    x = max_pool_ceil(self.prelu3(self.conv3(x)), 2, 2)  # [b, 4, 4, 64]
    x = self.prelu4(self.conv4(x))  # [b, 3, 3, 128]
    # PyTorch flattens NCHW features permuted to (0, 3, 2, 1): (width, height,
    # channel) order. From NHWC that is a height/width swap.
    x = jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)
    x = self.prelu5(self.dense5(x))
    logits = self.dense6_1(x).astype(jnp.float32)
    box_reg = self.dense6_2(x).astype(jnp.float32)
    points = self.dense6_3(x).astype(jnp.float32)
    return box_reg, points, jax.nn.softmax(logits, axis=-1)


def normalize(images: jax.Array) -> jax.Array:
  """MTCNN's input normalisation `(pixel - 127.5) * 0.0078125`, as float32."""
  return (jnp.asarray(images).astype(jnp.float32) - _PIXEL_MEAN) * _PIXEL_SCALE


# --- Weights --------------------------------------------------------------


def to_flax_layout(value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> flax layout for one state_dict entry."""
  if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # linear [out, in] -> [in, out]
    return value.T
  return value


def _from_flax(value: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch layout (inverse of `to_flax_layout`)."""
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if value.ndim == 2:
    return value.T
  return value


def _param(model: ONet, key: str) -> nnx.Param:
  """The parameter of `model` that state_dict entry `key` ("layer.name") fills."""
  layer, name = key.split(".")
  if name == "weight" and not layer.startswith("prelu"):
    name = "kernel"
  return getattr(getattr(model, layer), name)


def load_state_dict(model: ONet, state_dict: Mapping[str, Any]) -> ONet:
  """Copies a facenet-pytorch O-Net state_dict (numpy arrays) into `model`.

  Args:
    model: the O-Net to fill in place.
    state_dict: key -> array in PyTorch layout, keys as in `STATE_DICT_SHAPES`.

  Returns:
    `model`.

  Raises:
    ValueError: naming the first missing or unexpected key, or the key whose
      shape differs (with expected and actual shapes).
  """
  missing = [k for k in STATE_DICT_SHAPES if k not in state_dict]
  if missing:
    raise ValueError(f"O-Net state_dict is missing key(s) {missing}")
  unexpected = sorted(k for k in state_dict if k not in STATE_DICT_SHAPES)
  if unexpected:
    raise ValueError(f"O-Net state_dict has unexpected key(s) {unexpected}")
  for key, shape in STATE_DICT_SHAPES.items():
    value = np.asarray(state_dict[key])
    if value.shape != shape:
      raise ValueError(
          f"O-Net state_dict key {key!r} has shape {value.shape}, expected {shape}"
      )
    param = _param(model, key)
    param[...] = jnp.asarray(to_flax_layout(value), dtype=param[...].dtype)
  return model


def state_dict(model: ONet) -> dict[str, np.ndarray]:
  """The model's weights as a facenet-pytorch state_dict of float32 numpy arrays."""
  return {
      key: np.ascontiguousarray(_from_flax(np.asarray(_param(model, key)[...], np.float32)))
      for key in STATE_DICT_SHAPES
  }


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} (a PyTorch state_dict) needs torch, which is used only to convert "
        "the weights: run `vigface_jax.models.onet.convert_onet(path, out_npz)` once where "
        "torch is installed and load the .npz instead."
    ) from e
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{path!r} holds a {type(loaded).__name__}, not an O-Net state_dict")
  return {
      k: v.detach().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
      for k, v in loaded.items()
  }


def load_facenet_pytorch_onet(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
) -> ONet:
  """Builds an O-Net from facenet-pytorch's `onet.pt` or from our `.npz`.

  Args:
    path: `facenet_pytorch/data/onet.pt` (a PyTorch state_dict; reading it
      needs torch) or a file written by `save_npz`/`convert_onet` (ends in
      `.npz`; numpy only).
    dtype: compute dtype of the model.
    precision: matmul/convolution precision of the model.

  Returns:
    The loaded `ONet` (float32 parameters).

  Raises:
    ImportError: `path` is not an `.npz` and torch is not installed.
    ValueError: keys or shapes do not match `STATE_DICT_SHAPES`.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      weights = {k: data[k] for k in data.files}
  else:
    weights = _read_torch_state_dict(path)
  model = ONet(dtype=dtype, precision=precision, rngs=nnx.Rngs(0))
  load_state_dict(model, weights)
  logging.info("Loaded O-Net weights from %s", path)
  return model


def save_npz(model: ONet, path: str | os.PathLike) -> None:
  """Writes the model's weights as an `.npz` that `load_facenet_pytorch_onet` reads.

  The arrays keep facenet-pytorch's keys and PyTorch layout, so the file is a
  plain-numpy copy of `onet.pt`.
  """
  np.savez(os.fspath(path), **state_dict(model))


def convert_onet(pt_path: str | os.PathLike, out_npz: str | os.PathLike) -> None:
  """Converts facenet-pytorch's `onet.pt` to an `.npz` (run once where torch exists)."""
  save_npz(load_facenet_pytorch_onet(pt_path), out_npz)
  logging.info("Wrote %s", os.fspath(out_npz))


# --- Inference ------------------------------------------------------------


def resize_to_input(images: jax.Array) -> jax.Array:
  """Resizes `[batch, height, width, 3]` images to O-Net's 48x48, as float32.

  Bilinear with half-pixel centres (`jax.image.resize(..., "linear")`),
  antialiased when shrinking, which approximates MTCNN's area resampling.
  A 48x48 input passes through unchanged.
  """
  images = jnp.asarray(images).astype(jnp.float32)
  if images.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return images
  shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[3])
  return jax.image.resize(images, shape, method="linear", antialias=True)


@nnx.jit
def _predict(model: ONet, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Landmarks `[b, 5, 2]` in the images' pixels and face probability `[b]`."""
  height, width = images.shape[1:3]
  _, rel, prob = model(normalize(resize_to_input(images)))
  # MTCNN's map with the whole image as the box: x = 0 + width * l.
  xs = rel[:, :NUM_LANDMARKS] * width
  ys = rel[:, NUM_LANDMARKS:] * height
  return jnp.stack([xs, ys], axis=-1), prob[:, 1]


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [batch, height, width, 3], got {images.shape}")
  return images


def predict_landmarks(
    model: ONet, crops: Any, *, return_prob: bool = False,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Five landmarks of the face in each crop, in the crop's pixel coordinates.

  Each crop is taken as MTCNN's box: resized to 48x48 (`resize_to_input`),
  run through O-Net, and the relative outputs mapped with MTCNN's formula
  `x = width * l[0:5]`, `y = height * l[5:10]` (pixel centres at integers;
  see the module docstring). Jitted; compiles once per input shape.

  Args:
    model: a loaded `ONet`.
    crops: uint8 (or float in [0, 255]) RGB `[batch, height, width, 3]`.
    return_prob: also return O-Net's face probability.
    sharding: where to place the batch, e.g. split over a mesh's data axis
      so that every device runs part of it (the batch must divide evenly).

  Returns:
    float32 `[batch, 5, 2]` points `(x, y)` in ArcFace order, and with
    `return_prob` a float32 `[batch]` face probability.
  """
  crops = _check_images(crops)
  crops = jnp.asarray(crops) if sharding is None else jax.device_put(crops, sharding)
  points, prob = _predict(model, crops)
  points = np.asarray(points, dtype=np.float32)
  if return_prob:
    return points, np.asarray(prob, dtype=np.float32)
  return points


def landmarks_for_aligned_faces(
    model: ONet,
    images: Any,
    *,
    box: tuple[int, int, int] = ALIGNED_FACE_BOX,
    return_prob: bool = False,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Five landmarks of already aligned faces, in the aligned frame.

  Crops `box` (default `ALIGNED_FACE_BOX`), resizes it to 48x48, runs O-Net
  and maps the points back: `x = x0 + side * l[0:5]`, `y = y0 + side * l[5:10]`.

  Args:
    model: a loaded `ONet`.
    images: uint8 RGB `[batch, 112, 112, 3]` faces aligned to the ArcFace
      template (any square size works; `box` is in its pixels).
    box: `(x0, y0, side)`: the crop covers columns `x0 ... x0 + side - 1` and
      rows `y0 ... y0 + side - 1`; pixels outside the image read black.
    return_prob: also return O-Net's face probability.
    sharding: batch placement, as in `predict_landmarks`.

  Returns:
    float32 `[batch, 5, 2]` points `(x, y)` in ArcFace order, and with
    `return_prob` a float32 `[batch]` face probability.
  """
  images = _check_images(images)
  x0, y0, side = box
  height, width = images.shape[1:3]
  if side <= 0:
    raise ValueError(f"box side must be positive, got {box}")
  # Parts of the box outside the image read black, like the border of an
  # aligned crop (`landmarks.warp_affine`).
  pad = ((0, 0), (max(0, -y0), max(0, y0 + side - height)),
         (max(0, -x0), max(0, x0 + side - width)), (0, 0))
  if any(p for axis in pad for p in axis):
    images = np.pad(images, pad)
  top, left = y0 + pad[1][0], x0 + pad[2][0]
  crops = images[:, top:top + side, left:left + side]
  points, prob = predict_landmarks(model, crops, return_prob=True, sharding=sharding)
  points = points + np.array([x0, y0], dtype=np.float32)
  if return_prob:
    return points, prob
  return points
