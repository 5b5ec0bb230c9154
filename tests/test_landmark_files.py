"""Tests for five-point landmark side files (read, write, frame check)."""

import logging
import os

import numpy as np
import pytest

from vigface_jax.data import landmark_files
from vigface_jax.data import landmarks as landmarks_lib

TEMPLATE = landmarks_lib.ARCFACE_TEMPLATE


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def _row(name, points, extra=""):
  return " ".join([name] + [f"{v:.4f}" for v in np.ravel(points)]) + extra


def test_round_trip_is_exact_and_ordered(tmp_path):
  rng = np.random.default_rng(0)
  mapping = {
      "id_b/002.jpg": TEMPLATE + rng.normal(0, 3, (5, 2)).astype(np.float32),
      "id_a/001.png": TEMPLATE.copy(),
      "id_a/sub/x#1.jpg": rng.uniform(-1e3, 1e3, (5, 2)).astype(np.float32),
  }
  path = tmp_path / "out" / "landmarks.txt"
  landmark_files.write_landmarks(path, mapping, header="made by a test\nsecond line")
  text = path.read_text()
  assert text.startswith("# made by a test\n# second line\n")
  # Shortest float32 text, not 17-digit float64 noise.
  assert "38.2946 51.6963" in text
  back = landmark_files.read_landmarks(path)
  assert list(back) == list(mapping)
  for key, points in mapping.items():
    assert back[key].dtype == np.float32 and back[key].shape == (5, 2)
    np.testing.assert_array_equal(back[key], points)
  # Atomic write leaves no temporary file behind, and overwrites in place.
  landmark_files.write_landmarks(path, {"a.jpg": TEMPLATE})
  assert os.listdir(path.parent) == ["landmarks.txt"]
  assert list(landmark_files.read_landmarks(path)) == ["a.jpg"]


def test_write_rejects_bad_entries(tmp_path):
  path = tmp_path / "l.txt"
  with pytest.raises(ValueError, match="'bad name.jpg'.*whitespace"):
    landmark_files.write_landmarks(path, {"bad name.jpg": TEMPLATE})
  with pytest.raises(ValueError, match=r"'a.jpg' has shape \(4, 2\)"):
    landmark_files.write_landmarks(path, {"a.jpg": TEMPLATE[:4]})
  bad = TEMPLATE.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="'a.jpg' has non-finite"):
    landmark_files.write_landmarks(path, {"a.jpg": bad})
  assert not path.exists()


def test_reads_separators_comments_bom_and_normalises_names(tmp_path):
  p = TEMPLATE.ravel()
  lines = [
      "\ufeff# whole-line comment",
      "",
      "./id0/a.jpg\t" + "\t".join(f"{v}" for v in p),
      "id0//b.jpg  " + "   ".join(f"{v}" for v in p) + "  # trailing comment",
      "id1/c#d.jpg " + " ".join(f"{v}" for v in p + 1),
  ]
  path = _write(tmp_path / "l.txt", "\r\n".join(lines) + "\r\n")
  got = landmark_files.read_landmarks(path)
  assert list(got) == ["id0/a.jpg", "id0/b.jpg", "id1/c#d.jpg"]
  np.testing.assert_allclose(got["id0/a.jpg"], TEMPLATE)
  np.testing.assert_allclose(got["id1/c#d.jpg"], TEMPLATE + 1)


def test_ijb_six_column_variant(tmp_path):
  points = TEMPLATE * 2 + 10
  path = _write(tmp_path / "ijbc_name_5pts_score.txt",
                _row("1.jpg", points, " 0.99") + "\n" + _row("2.jpg", points, " 0.5") + "\n")
  got = landmark_files.read_landmarks(path)
  assert list(got) == ["1.jpg", "2.jpg"]
  np.testing.assert_allclose(got["1.jpg"], points, atol=1e-4)
  # The score column is parsed: a non-number there is an error, not ignored.
  _write(path, _row("1.jpg", points, " 0.99") + "\n" + _row("2.jpg", points, " high") + "\n")
  with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt, line 2: column 12 is 'high'"):
    landmark_files.read_landmarks(path)


@pytest.mark.parametrize("lines, pattern", [
    (["a.jpg 1 2 3"], r"line 1: 4 columns, expected 11"),
    ([_row("a.jpg", TEMPLATE), "# c", _row("b.jpg", TEMPLATE[:4])],
     r"line 3: 9 columns"),
    ([_row("a.jpg", TEMPLATE), _row("b.jpg", TEMPLATE, " 0.9")],
     r"line 2: 12 columns, but line 1 had 11"),
    ([_row("a.jpg", TEMPLATE), "b.jpg 1 2 3 x 5 6 7 8 9 10"],
     r"line 2: column 5 is 'x', not a number"),
    (["", "a.jpg 1 2 3 4 nan 6 7 8 9 10"], r"line 2: coordinate in column 6 is 'nan'"),
    (["a.jpg 1 2 3 4 5 6 7 8 9 -inf"], r"line 1: coordinate in column 11 is '-inf'"),
    ([_row("a.jpg", TEMPLATE), _row("b.jpg", TEMPLATE), _row("./a.jpg", TEMPLATE)],
     r"line 3: duplicate entry for 'a.jpg' \(first on line 1\)"),
])
def test_read_errors_name_file_and_line(tmp_path, lines, pattern):
  path = _write(tmp_path / "marks.txt", "\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"marks.txt, " + pattern):
    landmark_files.read_landmarks(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    landmark_files.read_landmarks(tmp_path / "nope.txt")


def test_record_keys(tmp_path):
  path = _write(tmp_path / "rec.txt", _row("7", TEMPLATE) + "\n" + _row("12", TEMPLATE + 1) + "\n")
  got = landmark_files.read_landmarks(path, record_keys=True)
  assert list(got) == [7, 12]
  np.testing.assert_allclose(got[12], TEMPLATE + 1, atol=1e-4)
  # Written int keys read back the same.
  landmark_files.write_landmarks(tmp_path / "w.txt", got)
  assert list(landmark_files.read_landmarks(tmp_path / "w.txt", record_keys=True)) == [7, 12]
  _write(path, _row("7", TEMPLATE) + "\n" + _row("007", TEMPLATE) + "\n")
  with pytest.raises(ValueError, match=r"line 2: duplicate entry for 7 \(first on line 1\)"):
    landmark_files.read_landmarks(path, record_keys=True)
  _write(path, _row("7", TEMPLATE) + "\n" + _row("a.jpg", TEMPLATE) + "\n")
  with pytest.raises(ValueError, match=r"line 2: record key 'a.jpg' is not an integer"):
    landmark_files.read_landmarks(path, record_keys=True)
  _write(path, _row("-3", TEMPLATE) + "\n")
  with pytest.raises(ValueError, match=r"line 1: record key -3 is negative"):
    landmark_files.read_landmarks(path, record_keys=True)


def test_check_frame_accepts_aligned_points(caplog):
  rng = np.random.default_rng(1)
  batch = TEMPLATE + rng.normal(0, 3, (64, 5, 2))
  with caplog.at_level(logging.WARNING):
    assert landmark_files.check_frame(batch) == []
    assert landmark_files.check_frame(TEMPLATE) == []
    assert landmark_files.check_frame(TEMPLATE * 2, size=224) == []
  assert not caplog.records


@pytest.mark.parametrize("points, what", [
    (TEMPLATE * 3 + 300, "all five points outside"),  # original-image coordinates
    (TEMPLATE + [60, 0], "centroid more than 28 px"),
    (TEMPLATE / 112, "spread outside"),  # normalised coordinates
    (TEMPLATE[:, ::-1], "eyes not clearly above the mouth"),  # (y, x) order
    (landmarks_lib.flip_landmarks(TEMPLATE)[[1, 0, 2, 4, 3]], "left and right swapped"),
])
def test_check_frame_flags_other_frames(caplog, points, what):
  batch = np.stack([TEMPLATE, points, TEMPLATE])
  with caplog.at_level(logging.WARNING):
    problems = landmark_files.check_frame(batch, names=["a", "b", "c"], source="f.txt")
  assert any(what in p and "1 of 3" in p and "'b'" in p for p in problems), problems
  assert len(caplog.records) == 1
  assert "align_face" in caplog.text and "f.txt" in caplog.text
