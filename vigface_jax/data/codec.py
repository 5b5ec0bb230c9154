"""Image encoding shared by every writer (verification packs, RecordIO, ArrayRecord)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(image: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
  """uint8 RGB `[height, width, 3]` → JPEG (at `quality`) or PNG bytes.

  Args:
    image: the pixels.
    image_format: 'jpeg' or 'png' (case-insensitive).
    quality: JPEG quality; ignored for PNG.
  """
  fmt = image_format.lower()
  if fmt not in ("jpeg", "png"):
    raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(image, "RGB").save(buf, format="PNG")
  else:
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
