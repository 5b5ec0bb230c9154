"""Tests for the image-folder source (listing, decoding, landmarks, alignment)."""

import io
import logging
import pickle

import numpy as np
from PIL import Image
import pytest

from vigface_jax.data import imagefolder
from vigface_jax.data import landmark_files
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.data import pipeline

TEMPLATE = landmarks_lib.ARCFACE_TEMPLATE


def _face(seed: int, size: int = 112) -> np.ndarray:
  """A smooth RGB image (low frequencies, so bilinear warps barely change it)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  channels = []
  for _ in range(3):
    fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6)
    channels.append(127.5 + 100 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _save(path, image, fmt=None, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.fromarray(image)
  if mode is not None:
    img = img.convert(mode)
  img.save(path, format=fmt)
  return path


def _tree(root, layout):
  """`layout`: {folder: [file names]}; each file gets a distinct face (PNG or JPEG by name)."""
  seed = 0
  for folder, names in layout.items():
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
      fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
      _save(root / folder / name, _face(seed), fmt)
      seed += 1
  return root


def test_class_ids_and_order_follow_sorted_names(tmp_path):
  # Created out of order: ids and record order must not depend on creation order.
  _tree(tmp_path, {"charlie": ["b.png", "a.png"], "alpha": ["z.png", "m.png", "a2.png"],
                   "bravo": ["x.png"]})
  source = imagefolder.ImageFolderSource(tmp_path)
  assert source.classes == ["alpha", "bravo", "charlie"] and source.num_classes == 3
  keys = [source[i]["key"] for i in range(len(source))]
  assert keys == ["alpha/a2.png", "alpha/m.png", "alpha/z.png", "bravo/x.png",
                  "charlie/a.png", "charlie/b.png"]
  assert [int(source[i]["label"]) for i in range(len(source))] == [0, 0, 0, 1, 2, 2]
  assert source.labels.tolist() == [0, 0, 0, 1, 2, 2]
  element = source[4]
  expected = np.asarray(Image.open(tmp_path / "charlie/a.png"))
  np.testing.assert_array_equal(element["image"], expected)
  assert element["image"].dtype == np.uint8 and element["image"].shape == (112, 112, 3)
  assert element["label"].dtype == np.int32
  assert not element["has_landmarks"] and not element["landmarks"].any()
  with pytest.raises(IndexError):
    source[len(source)]


def test_extensions_case_hidden_and_nested(tmp_path, caplog):
  _tree(tmp_path, {"id": ["a.JPG", "b.jpeg", "c.PNG", "d.Png", "e.gif", ".hidden.jpg",
                          "sub/f.jpg"], ".ipynb_checkpoints": ["x.jpg"]})
  (tmp_path / "id" / "notes.txt").write_text("not an image")
  (tmp_path / "README.txt").write_text("non-image files in the root are ignored")
  with caplog.at_level(logging.INFO):
    source = imagefolder.ImageFolderSource(tmp_path)
  assert source.classes == ["id"]
  assert [source.key(i) for i in range(len(source))] == [
      "id/a.JPG", "id/b.jpeg", "id/c.PNG", "id/d.Png", "id/sub/f.jpg"]
  assert "ignored 2 files" in caplog.text  # e.gif, notes.txt
  only_png = imagefolder.ImageFolderSource(tmp_path, extensions=("PNG",))
  assert [only_png.key(i) for i in range(len(only_png))] == ["id/c.PNG", "id/d.Png"]


def test_epath_listing_matches_scandir(tmp_path):
  # The gs:// code path, run on a local folder.
  _tree(tmp_path, {"b": ["2.jpg", "n/1.PNG"], "a": ["x.jpg", ".h.jpg"], ".git": ["y.jpg"]})
  (tmp_path / "a" / "t.txt").write_text("")
  (tmp_path / "empty").mkdir()
  exts = (".jpg", ".png")
  local = imagefolder._list_local(str(tmp_path), exts)
  remote = imagefolder._list_epath(str(tmp_path), exts)
  assert sorted(local[0]) == sorted(remote[0]) == ["a", "b", "empty"]
  assert {k: sorted(v) for k, v in local[1].items()} == {k: sorted(v) for k, v in remote[1].items()}
  assert local[2:] == remote[2:] == ([], 1)


def test_modes_are_converted_to_rgb(tmp_path):
  face = _face(3)
  _save(tmp_path / "id/gray.png", face, "PNG", mode="L")
  rgba = np.concatenate([face, np.full((112, 112, 1), 77, np.uint8)], -1)
  _save(tmp_path / "id/rgba.png", rgba, "PNG")
  _save(tmp_path / "id/cmyk.jpg", face, "JPEG", mode="CMYK")
  _save(tmp_path / "id/pal.png", face, "PNG", mode="P")
  source = imagefolder.ImageFolderSource(tmp_path)
  images = {source[i]["key"]: source[i]["image"] for i in range(len(source))}
  for image in images.values():
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
  gray = np.asarray(Image.fromarray(face).convert("L"))
  np.testing.assert_array_equal(images["id/gray.png"], np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(images["id/rgba.png"], face)
  assert np.abs(images["id/cmyk.jpg"].astype(int) - face).mean() < 4
  # decode=False leaves conversion to pipeline.Decode, which gives the same pixels.
  raw = imagefolder.ImageFolderSource(tmp_path, decode=False)
  for i in range(len(raw)):
    element = raw[i]
    assert "image" not in element
    assert element["image_bytes"] == (tmp_path / element["key"]).read_bytes()
    np.testing.assert_array_equal(pipeline.Decode().map(element)["image"], images[element["key"]])


@pytest.mark.parametrize("decode", [True, False])
def test_wrong_size_is_an_error_naming_the_file(tmp_path, decode):
  _tree(tmp_path, {"id": ["ok.png"]})
  _save(tmp_path / "id/big.png", _face(1, size=120)[:, :100], "PNG")
  source = imagefolder.ImageFolderSource(tmp_path, decode=decode)
  with pytest.raises(ValueError, match=r"id/big.png is 100x120 .*expected 112x112.*align_face"):
    source[0]
  assert source[1]["key"] == "id/ok.png"


def test_align_recovers_a_known_similarity(tmp_path):
  face = _face(7)
  angle, scale = np.deg2rad(25.0), 1.8
  linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  shift = np.array([150.0, 130.0]) - linear @ [55.5, 55.5]  # face centre -> (150, 130)
  matrix = np.concatenate([linear, shift[:, None]], 1)
  big = landmarks_lib.warp_affine(face, matrix, out_size=(260, 300))
  _save(tmp_path / "photos/person/raw.png", big, "PNG")
  _save(tmp_path / "photos/person/crop.png", face, "PNG")
  points = landmarks_lib.apply_affine(matrix, TEMPLATE)
  crop_points = TEMPLATE + 1.5
  landmark_files.write_landmarks(tmp_path / "marks.txt",
                                 {"person/raw.png": points, "person/crop.png": crop_points})
  root = tmp_path / "photos"

  with pytest.raises(ValueError, match=r"raw.png is 300x260 .*align=True"):
    imagefolder.ImageFolderSource(root, landmarks_file=tmp_path / "marks.txt")[1]
  for decode in (True, False):
    source = imagefolder.ImageFolderSource(root, landmarks_file=tmp_path / "marks.txt",
                                           align=True, decode=decode)
    element = pipeline.Decode().map(source[1])  # person/raw.png
    assert element["has_landmarks"]
    np.testing.assert_allclose(element["landmarks"], TEMPLATE, atol=1e-3)
    diff = np.abs(element["image"].astype(int) - face)[3:-3, 3:-3]  # border pixels are partial
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())
    # A 112x112 image counts as already aligned: pixels and points as given.
    element = pipeline.Decode().map(source[0])
    np.testing.assert_array_equal(element["image"], face)
    np.testing.assert_allclose(element["landmarks"], crop_points)


def test_align_errors(tmp_path):
  _save(tmp_path / "root/id/raw.png", _face(0, size=150), "PNG")
  _save(tmp_path / "root/id/other.png", _face(1), "PNG")
  landmark_files.write_landmarks(tmp_path / "m.txt", {"id/other.png": TEMPLATE})
  with pytest.raises(ValueError, match="align=True needs a landmarks_file"):
    imagefolder.ImageFolderSource(tmp_path / "root", align=True)
  source = imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "m.txt",
                                         align=True)
  with pytest.raises(ValueError, match=r"id/raw.png is 150x150.*m.txt, which has none for it"):
    source[1]


def test_landmarks_file_and_missing_count(tmp_path, caplog):
  _tree(tmp_path / "root", {"a": ["1.png", "2.png"], "b": ["1.png", "2.png", "3.png"]})
  rng = np.random.default_rng(0)
  marks = {"b/3.png": TEMPLATE + rng.normal(0, 2, (5, 2)), "./a/1.png": TEMPLATE + 1,
           "b/1.png": TEMPLATE - 1, "gone/9.png": TEMPLATE}
  landmark_files.write_landmarks(tmp_path / "m.txt", marks)
  with caplog.at_level(logging.WARNING):
    source = imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "m.txt")
  assert source.num_missing_landmarks == 2
  missing_logs = [r for r in caplog.records if "have no landmarks" in r.getMessage()]
  assert len(missing_logs) == 1 and "2 of 5 images" in missing_logs[0].getMessage()
  got = {source.key(i): source[i] for i in range(len(source))}
  assert [k for k, e in got.items() if e["has_landmarks"]] == ["a/1.png", "b/1.png", "b/3.png"]
  np.testing.assert_allclose(got["a/1.png"]["landmarks"], TEMPLATE + 1)
  np.testing.assert_allclose(got["b/3.png"]["landmarks"], marks["b/3.png"], atol=1e-4)
  assert not got["a/2.png"]["landmarks"].any()
  for element in got.values():
    assert element["landmarks"].dtype == np.float32 and element["landmarks"].shape == (5, 2)


def test_landmarks_file_problems(tmp_path, caplog):
  _tree(tmp_path / "root", {"a": ["1.png"]})
  landmark_files.write_landmarks(tmp_path / "m.txt", {"root/a/1.png": TEMPLATE})
  with pytest.raises(ValueError, match=r"none of the 1 names .*'root/a/1.png'.*'a/1.png'"):
    imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "m.txt")
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ValueError, match="empty.txt has no entries"):
    imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "empty.txt")
  (tmp_path / "bad.txt").write_text("a/1.png 1 2 3\n")
  with pytest.raises(ValueError, match="bad.txt, line 1"):
    imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "bad.txt")
  # Points in original-image coordinates without align=True: a warning pointing to align_face.
  landmark_files.write_landmarks(tmp_path / "orig.txt", {"a/1.png": TEMPLATE * 4 + 200})
  with caplog.at_level(logging.WARNING):
    imagefolder.ImageFolderSource(tmp_path / "root", landmarks_file=tmp_path / "orig.txt")
  assert "align_face" in caplog.text and "orig.txt" in caplog.text


def test_bad_roots(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    imagefolder.ImageFolderSource(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="has no sub-folders"):
    imagefolder.ImageFolderSource(tmp_path / "empty")
  (tmp_path / "noimg/a").mkdir(parents=True)
  (tmp_path / "noimg/b").mkdir()
  (tmp_path / "noimg/b/x.txt").write_text("")
  with pytest.raises(ValueError, match="no images with extensions"):
    imagefolder.ImageFolderSource(tmp_path / "noimg")
  _tree(tmp_path / "flat", {"id": ["a.jpg"]})
  _save(tmp_path / "flat/stray.JPG", _face(0), "JPEG")
  with pytest.raises(ValueError, match=r"1 images lie directly in .*'stray.JPG'.*sub-folder"):
    imagefolder.ImageFolderSource(tmp_path / "flat")
  with pytest.raises(ValueError, match="on_error"):
    imagefolder.ImageFolderSource(tmp_path / "flat", on_error="ignore")


def test_empty_class_keeps_its_id(tmp_path, caplog):
  _tree(tmp_path, {"a": ["1.png"], "c": ["1.png"]})
  (tmp_path / "b").mkdir()
  with caplog.at_level(logging.WARNING):
    source = imagefolder.ImageFolderSource(tmp_path)
  assert source.classes == ["a", "b", "c"] and source.labels.tolist() == [0, 2]
  assert "1 identity folders have no images" in caplog.text


def test_undecodable_files_raise_or_skip(tmp_path):
  _tree(tmp_path, {"a": ["1.png", "3.png"], "b": ["1.png"]})
  (tmp_path / "a/2.png").write_bytes(b"definitely not a png")
  full = io.BytesIO()
  Image.fromarray(_face(9)).save(full, format="JPEG")
  (tmp_path / "a/4.jpg").write_bytes(full.getvalue()[:300])  # truncated JPEG
  source = imagefolder.ImageFolderSource(tmp_path)
  assert [source.key(i) for i in range(len(source))] == [
      "a/1.png", "a/2.png", "a/3.png", "a/4.jpg", "b/1.png"]
  with pytest.raises(ValueError, match=r"cannot decode .*a/2.png"):
    source[1]
  with pytest.raises(ValueError, match=r"cannot decode .*a/4.jpg"):
    source[3]

  skipping = imagefolder.ImageFolderSource(tmp_path, on_error="skip")
  # A bad record is replaced by the next readable one, the same one every time.
  assert skipping[1]["key"] == "a/3.png"
  element = skipping[3]
  assert element["key"] == "b/1.png" and element["label"] == 1
  assert skipping[0]["key"] == "a/1.png"
  assert skipping.num_skipped == 2
  (tmp_path / "a/1.png").unlink()  # vanished after listing: unreadable, skipped too
  assert skipping[0]["key"] == "a/3.png" and skipping.num_skipped == 4


def test_pickle_and_repr(tmp_path):
  _tree(tmp_path / "r", {"a": ["1.png", "2.jpg"], "b": ["1.png"]})
  landmark_files.write_landmarks(tmp_path / "m.txt", {"a/2.jpg": TEMPLATE})
  source = imagefolder.ImageFolderSource(tmp_path / "r", landmarks_file=tmp_path / "m.txt",
                                         on_error="skip")
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source) == (
      f"ImageFolderSource(root={str(tmp_path / 'r')!r}, num_images=3, num_classes=2, "
      f"landmarks_file={str(tmp_path / 'm.txt')!r}, decode=True, on_error='skip', "
      "align=False)")
  assert clone.classes == source.classes and len(clone) == len(source)
  for i in range(len(source)):
    a, b = source[i], clone[i]
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_make_loader_yields_the_element_spec(tmp_path):
  _tree(tmp_path, {"x": ["1.png", "2.jpg", "3.png"], "y": ["1.jpg", "2.png", "3.jpg"]})
  landmark_files.write_landmarks(tmp_path / "m.txt", {"x/1.png": TEMPLATE, "y/3.jpg": TEMPLATE})
  for decode in (True, False):
    source = imagefolder.ImageFolderSource(tmp_path, decode=decode)
    loader = pipeline.make_loader(source, global_batch_size=4, seed=0, worker_count=0)
    batch = next(iter(loader))
    assert set(batch) == set(pipeline.ELEMENT_SPEC)
    for key, (shape, dtype) in pipeline.ELEMENT_SPEC.items():
      assert batch[key].shape == (4,) + shape and batch[key].dtype == dtype, key
    assert set(batch["label"].tolist()) <= {0, 1}
