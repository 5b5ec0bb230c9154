"""Tests of `convert insightface`, `models.torch_checkpoint` and `evaluate.embed`.

torch is a test-only dependency: it writes the checkpoints (`torch.save`) and
gives the reference embeddings; the code under test never imports it. The tests that use it
ask for the `torch` fixture (skipped when torch is missing, failed under CI).
"""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import pytest

from vigface_jax import convert
from vigface_jax.evaluate import embed
from vigface_jax.models import iresnet
from vigface_jax.models import torch_checkpoint

from conftest import require
from tests.test_iresnet import _randomise, _torch_model

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _l2(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch():
  return require("torch", "writes the checkpoints and the reference embeddings "
                 "(pip install torch==2.13.0)")


def _torch_embed(tmodel, images):
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    return tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _torch_numpy(t):
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


@pytest.mark.parametrize("variant", ["tiny", "tiny_se"])
def test_convert_and_embed_match_torch(tmp_path, variant, torch):
  tmodel = _randomise(_torch_model(variant), seed=3)
  src = tmp_path / "model.pt"
  torch.save(tmodel.state_dict(), src)
  out = tmp_path / "backbone"
  summary = convert.convert_insightface(str(src), str(out), arch=variant)
  assert summary["arch"] == variant and summary["out"] == str(out)
  embed_fn, info = embed.load_embedder(out, batch_size=2)
  assert info["arch"] == variant and info["embed_dim"] == 512 and info["input_size"] == 112
  images = _images(3, seed=4)
  got = embed_fn(images)
  assert got.shape == (3, 512) and got.dtype == np.float32
  np.testing.assert_allclose(_l2(got), _l2(_torch_embed(tmodel, images)), atol=1e-4)

  # A training workdir holding the backbone as export/ works too.
  os.rename(out, tmp_path / "export")
  model, info = embed.load_backbone(tmp_path)
  assert info["directory"] == str(tmp_path / "export")
  np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]),
                                tmodel.fc.weight.detach().numpy().T)

  with pytest.raises(ValueError, match="already holds a backbone"):
    convert.convert_insightface(str(src), str(tmp_path / "export"), arch=variant)
  convert.convert_insightface(str(src), str(tmp_path / "export"), arch=variant, force=True)


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run([sys.executable, "-m", "vigface_jax.convert", "insightface", *args],
                        env=env, cwd=_REPO, capture_output=True, text=True, timeout=120,
                        check=False)


def test_cli(tmp_path, torch):
  tmodel = _randomise(_torch_model("tiny"), seed=5)
  src = tmp_path / "model.pt"
  # A DDP checkpoint wrapped like a training checkpoint.
  torch.save({"state_dict": {f"module.{k}": v for k, v in tmodel.state_dict().items()},
              "epoch": 7}, src)
  out = tmp_path / "out"
  result = _run_cli(f"--src={src}", "--arch=tiny", f"--out={out}", "--embed_dim=512")
  assert result.returncode == 0, result.stderr[-3000:]
  embed_fn, _ = embed.load_embedder(out)
  images = _images(2, seed=6)
  np.testing.assert_allclose(_l2(embed_fn(images)), _l2(_torch_embed(tmodel, images)),
                             atol=1e-4)

  # Wrong arch: a one-line error naming a key, no traceback.
  result = _run_cli(f"--src={src}", "--arch=tiny_se", f"--out={tmp_path / 'se'}")
  assert result.returncode == 2
  assert "se.fc1.weight" in result.stderr and "Traceback" not in result.stderr
  result = _run_cli(f"--src={src}", "--arch=r51", f"--out={tmp_path / 'x'}")
  assert result.returncode == 2
  assert "Unknown IResNet variant 'r51'" in result.stderr and "Traceback" not in result.stderr


def test_wrong_shape_names_the_key(tmp_path, torch):
  sd = _torch_model("tiny").state_dict()
  good = tmp_path / "good.pt"
  torch.save(sd, good)
  with pytest.raises(ValueError, match=r"good\.pt.*fc\.weight.*\(512, 3136\).*\(128, 3136\)"):
    convert.convert_insightface(str(good), str(tmp_path / "out"), arch="tiny", embed_dim=128)
  sd["layer3.0.conv2.weight"] = torch.zeros(32, 32, 3, 1)
  bad = tmp_path / "bad.pt"
  torch.save(sd, bad)
  with pytest.raises(ValueError, match=r"layer3\.0\.conv2\.weight.*\(32, 32, 3, 1\)"):
    convert.convert_insightface(str(bad), str(tmp_path / "out"), arch="tiny")
  assert not (tmp_path / "out").exists()


def test_reads_like_torch_load(tmp_path, torch):
  g = torch.Generator().manual_seed(0)
  a = torch.randn(3, 5, generator=g)
  tensors = {
      "f32": a,
      "transposed": a.t(),
      "sliced": torch.randn(4, 6, generator=g)[1:, ::2],
      "f16": torch.randn(7, generator=g).half(),
      "bf16": torch.randn(2, 3, generator=g).bfloat16(),
      "bf16_t": torch.randn(3, 2, generator=g).bfloat16().t(),
      "i64": torch.arange(12).reshape(3, 4)[:, 1:],
      "bool": torch.tensor([True, False, True]),
      "u8": torch.arange(5, dtype=torch.uint8),
      "scalar": torch.tensor(2.5, dtype=torch.float64),
      "empty": torch.zeros(0, 4),
      "param": torch.nn.Parameter(torch.ones(3)),
  }
  plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
  torch.save(tensors, plain)
  torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "step": 3}, wrapped)
  for path, prefix in ((plain, ""), (wrapped, "module.")):
    got = torch_checkpoint.load_state_dict(path)
    loaded = torch.load(path)
    want = loaded["state_dict"] if prefix else loaded
    assert sorted(got) == sorted(tensors)
    for key, value in want.items():
      ref = _torch_numpy(value)
      out = got[key[len(prefix):]]
      assert out.dtype == ref.dtype and out.shape == ref.shape, key
      assert out.flags.c_contiguous, key
      np.testing.assert_array_equal(out, ref, err_msg=key)


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"w": _Evil(marker)}, protocol=2))
    z.writestr("archive/byteorder", "little")
  with pytest.raises(ValueError, match=r"evil\.pt.*refusing to load global '(posix|os)\.system'"):
    torch_checkpoint.load_state_dict(path)
  assert not marker.exists()
  # Sanity check of the test itself: plain pickle would have run it.
  pickle.loads(pickle.dumps(_Evil(marker), protocol=2))
  assert marker.exists()


def test_corrupt_files_name_the_path(tmp_path, torch):
  path = tmp_path / "model.pt"
  torch.save({"w": torch.randn(64, 64)}, path)
  data = path.read_bytes()
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated\.pt.*(truncated|corrupt)"):
    torch_checkpoint.load_state_dict(truncated)
  legacy = tmp_path / "legacy.pt"
  torch.save({"w": torch.randn(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match=r"legacy\.pt.*re-save with torch>=1\.6 zip format"):
    torch_checkpoint.load_state_dict(legacy)
  with pytest.raises(FileNotFoundError, match="missing.pt"):
    torch_checkpoint.load_state_dict(tmp_path / "missing.pt")
  not_state = tmp_path / "list.pt"
  torch.save({"stuff": [1, 2]}, not_state)
  with pytest.raises(ValueError, match=r"list\.pt.*no state_dict"):
    torch_checkpoint.load_state_dict(not_state)


def test_load_backbone_errors(tmp_path):
  with pytest.raises(ValueError, match=r"no backbone\.json"):
    embed.load_backbone(tmp_path)
  (tmp_path / "backbone.json").write_text('{"format": "other/1"}')
  with pytest.raises(ValueError, match=r"backbone\.json.*format 'other/1'"):
    embed.load_backbone(tmp_path)
  (tmp_path / "backbone.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"backbone\.json.*unreadable"):
    embed.load_backbone(tmp_path)

  # Zeros + one random kernel: a random init would compile an initialiser per shape.
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: iresnet.IResNet("tiny", embed_dim=16, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(embed.placeholder, state))
  model.fc.kernel[...] = np.random.default_rng(0).normal(size=(3136, 16)).astype(np.float32)
  out = tmp_path / "small"
  embed.save_backbone(out, model, arch="tiny", embed_dim=16, extra={"step": 5})
  loaded, info = embed.load_backbone(out)
  assert info["step"] == 5 and loaded.bn1.use_running_average  # eval mode
  np.testing.assert_array_equal(np.asarray(loaded.fc.kernel[...]),
                                np.asarray(model.fc.kernel[...]))
  # backbone.json describing another model than the weights: named, with what to do.
  (out / "backbone.json").write_text(
      (out / "backbone.json").read_text().replace('"embed_dim": 16', '"embed_dim": 32'))
  with pytest.raises(ValueError, match=r"small/backbone.*shape.*re-export"):
    embed.load_backbone(out)


def test_a_zip_bomb_or_a_lying_size_is_refused_before_it_is_read(tmp_path, torch):
  path = tmp_path / "model.pt"
  torch.save({"w": torch.zeros(100_000)}, path)  # 400 kB of zeros, stored uncompressed
  assert torch_checkpoint.load_state_dict(path)["w"].shape == (100_000,)  # the control

  def rewrite(out, change):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
      for info in src.infolist():
        data = src.read(info)
        name, data, compress = change(info.filename, data)
        dst.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return out

  record = next(n for n in zipfile.ZipFile(path).namelist() if "/data/" in n)
  # The same bytes deflated: 400 kB from about 400 bytes, 1,000x.
  bomb = rewrite(tmp_path / "bomb.pt", lambda n, d: (
      n, d, zipfile.ZIP_DEFLATED if n == record else zipfile.ZIP_STORED))
  with pytest.raises(ValueError, match=r"bomb\.pt: record .*data/0.* would inflate .*zip bomb"):
    torch_checkpoint.load_state_dict(bomb)
  # A record shorter than the tensor the pickle declares: refused from the directory.
  short = rewrite(tmp_path / "short.pt", lambda n, d: (
      n, d[:1000] if n == record else d, zipfile.ZIP_STORED))
  with pytest.raises(ValueError, match=r"short\.pt: storage record .* has 1000 bytes, expected "
                                       r"100000 x 4"):
    torch_checkpoint.load_state_dict(short)
