r"""Stage 3, JAX vs references: the dataset generator's sampler loop and the audit's exact search.

    pip install faiss-cpu  # the search reference; not a dependency of the package
    python -m benchmarks.generate --batch=16 --batches=4 --sample_steps=50 \
        --queries=20000 --gallery=100000 --dim=128 --ks=1,10 [--write]

    python -m benchmarks.generate --quick  # seconds: batch 4, 2 steps, small gallery

Two measurements in one run, each with a correctness check before anything is timed, one
warm-up, then `--repeats` / `--search_repeats` timed runs whose median is reported, and the
ratio reference time / our time (> 1: ours faster).

**1. Generation images/s** (`--batches` batches of `--batch` 112x112 faces, `--sample_steps`
DDIM steps, eta 0, `--spacing` spacing, v-prediction, x0 clipped, guidance `--guidance` at
every step; the model is `configs/dit.py:demo`'s (DiT-small/16, output_overlap 4,
landmark_blur (6, 16), float32, `--scan_blocks` as the demo trains it) from the flags of
`benchmarks/dit_step.py`, with random weights).

* **JAX (ours)**: the `generate` task's hot path. `sampling.Generator(...,
  per_example_keys=True)` (its jitted `sample(params, rest, rows, landmark_images, keys,
  guidance)`), driven by `generate.task.Drawer._sample` itself: per-image raw keys from
  `sampling.image_keys(seed, labels, indices)`, each batch padded (`ops.pad_batch`) and
  dispatched one ahead of the previous batch's device→host copy into the shard's uint8 array.
* **Reference**: the same DiT in PyTorch (`benchmarks/dit_step.py`'s `TorchDiT`, weights
  copied with `copy_into_torch`) sampled by `benchmarks/sample.py`'s `torch_sample` (torch
  landmark channels once per call, a Python loop over `diffusers.DDIMScheduler` with the
  doubled `[x; x]` batch, `uncond + s * (cond - uncond)`, under `torch.inference_mode`), batch
  by batch into the same uint8 array (`.numpy()` is the host copy).

Both sides start from the same x_T: with per-example keys the sampler draws image i's x_T
from `jax.random.split(key_i)[0]` (`diffusion/samplers.py` `_initial_noise`); that is
recomputed here for torch (outside its timed loop; the JAX side draws it inside), so with
eta = 0 the images must agree: max |JAX - torch| <= 2 uint8 levels over every image is asserted
before timing. The demo's own sampler (eta 1, guidance interval, guidance rescale) is not used:
with eta > 0 the sides would draw different noise, and diffusers' loop has no interval or
rescale; the per-step cost is the same DiT call. The JAX side's first call (trace + compile +
one batch) is reported separately.

Optionally (`--encode`, default on) also: PNG encoding of the images with the store's one
encoder (`generate.store.encode_image`, one thread), and each side's loop with encoding on a
background thread as `Drawer.draw` does it (the images split into `--shards` shards; shard
s + 1 is drawn while shard s is encoded).

**2. Audit search queries/s** (`--queries` queries against a `--gallery` gallery of `--dim`-d
L2-normalised Gaussian vectors, top-k for each k of `--ks`).

* **Ours**: `generate.search.Searcher` / `search.nearest` (exact; gallery products in bfloat16
  with float32 accumulation, `k + 8` candidates rescored in float32 on the host: the audit's
  default), and the same with `dtype=float32` products.
* **Reference**: `faiss.IndexFlatIP` (exact, float32), `--threads` OpenMP threads.

Agreement first (against faiss): the fraction of equal top-1 indices, the largest exact
(float64) similarity gap between the two top-1 rows where they differ (asserted <= 1e-5: only
near-ties may differ), recall of faiss's top-k in ours and the largest |sim difference| at any
rank (asserted <= 1e-5). Timed: the search with the gallery already placed (our compiled
program cached; faiss's index built), and once each the one-shot cost (`search.nearest`:
placement + compile + search; faiss: `IndexFlatIP` + `add` + `search`).

Threads: as the other benchmarks (`benchmarks/cpu_threads.py`: the process pinned to
`--threads` CPUs before jax starts; `torch.set_num_threads` and `faiss.omp_set_num_threads`
to `--threads`). `--write` replaces the "## Stage-3 generation and audit search" section of
`--output` (BENCHMARKS.md).

`--json=PATH` also writes the figures (and the device's peak memory where the backend
reports it) as JSON: what `benchmarks/run.py` reads.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import sys
import time
import types
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/generate.py`: make the repo importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import cpu_threads  # pins --threads CPUs; before jax  # pylint: disable=g-bad-import-order
from benchmarks import dit_step  # pylint: disable=g-bad-import-order
from benchmarks import sample as sample_bench  # pylint: disable=g-bad-import-order

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import diffusers
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import data_pipeline as dp
from vigface_jax.data import landmarks as landmarks_lib
from vigface_jax.diffusion import schedules
from vigface_jax.generate import sampling
from vigface_jax.generate import search
from vigface_jax.generate import store
from vigface_jax.generate import task
from vigface_jax.models import dit
from vigface_jax.models import stage2
from vigface_jax.train import dit as dit_train
# pylint: enable=g-import-not-at-top,wrong-import-position

_PARTS = flags.DEFINE_list("parts", ["generation", "search"],
                           "Which measurements to run: generation, search.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches of --batch images per timed run.")
_SCAN = flags.DEFINE_bool("scan_blocks", bool(dit_step._DEMO.model.scan_blocks),  # pylint: disable=protected-access
                          "JAX DiT blocks as one lax.scan (configs/dit.py:demo's setting).")
_ENCODE = flags.DEFINE_bool("encode", True, "Also time PNG encoding (store.encode_image).")
_SHARDS = flags.DEFINE_integer("shards", 2, "Shards the images split into for the "
                               "draw + background-encoding runs (divides --batches).")
_IMAGES_PER_ID = flags.DEFINE_integer("images_per_id", 4, "Images per identity: the "
                                      "(label, index) pairs the per-image keys come from.")
_QUERIES = flags.DEFINE_integer("queries", 20000, "Search queries.")
_GALLERY = flags.DEFINE_integer("gallery", 100000, "Search gallery rows.")
_DIM = flags.DEFINE_integer("dim", 128, "Embedding dimension of the search.")
_KS = flags.DEFINE_list("ks", ["1", "10"], "Neighbours per query to search for.")
_SEARCH_REPEATS = flags.DEFINE_integer("search_repeats", 3, "Timed searches per side and k.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings for a check in seconds (batch 4, 2 "
                           "batches, 2 steps, 1 repeat, 1024 queries x 8192 gallery rows); "
                           "flags given explicitly win.")
_QUICK_VALUES = {"batch": 4, "batches": 2, "shards": 2, "sample_steps": 2, "repeats": 1,
                 "queries": 1024, "gallery": 8192, "search_repeats": 1}

SECTION = "## Stage-3 generation and audit search"
AGREE_LEVELS = sample_bench.AGREE_LEVELS  # uint8 levels, as benchmarks/sample.py
SIM_TOL = 1e-5  # float32 similarities of unit vectors: ours (rescored) vs faiss
IMAGE = (dit_step.INPUT_SIZE, dit_step.INPUT_SIZE, 3)


def _faiss():
  """The faiss module, or exit naming the package to install."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        "benchmarks.generate: the audit-search reference needs faiss, which is not installed: "
        "`pip install faiss-cpu` (or run only the generation part with --parts=generation)."
    ) from e
  return faiss


# ------------------------------------------------------------------ generation


def initial_noise(keys: np.ndarray) -> np.ndarray:
  """x_T `[n, 112, 112, 3]` that `samplers.ddim_sample` draws from per-image raw keys `[n, 2]`:
  image i from `jax.random.split(keys[i])[0]` (`samplers._initial_noise` / `_normal`)."""
  draw = jax.jit(jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], IMAGE,
                                                      jnp.float32)))
  return np.asarray(draw(jnp.asarray(keys, jnp.uint32)))


class _NoBar:
  """`tqdm` stand-in for `Drawer._sample`'s progress bar."""

  def update(self, n: int) -> None:
    del n


def _drawer(generator: sampling.Generator, params: Any, rest: Any,
            guidance: float) -> task.Drawer:
  """A `task.Drawer` holding just what `_sample` reads (the run's weights, the generator)."""
  drawer = object.__new__(task.Drawer)
  drawer.generator = generator
  drawer.run = types.SimpleNamespace(params=params, rest=rest)
  drawer.guidance = guidance
  return drawer


def _with_encoding(draw: Callable[[int, int], np.ndarray], n: int, shards: int) -> None:
  """`draw(start, stop)` shard by shard, each shard PNG-encoded on one background thread
  while the next is drawn (as `task.Drawer.draw` with `store.write_shard`)."""
  per = n // shards
  encode = lambda images: [store.encode_image(im, "png") for im in images]
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
    pending = None
    for s in range(shards):
      images = draw(s * per, (s + 1) * per)
      if pending is not None:
        pending.result()
      pending = writer.submit(encode, images)
    pending.result()


def generation() -> dict[str, Any]:
  """Images/s of the generator's sampler loop and of the torch + diffusers loop."""
  seed, threads = dit_step._SEED.value, dit_step._THREADS.value  # pylint: disable=protected-access
  torch.manual_seed(seed)
  torch.set_num_threads(threads)
  b, n = dit_step._BATCH.value, dit_step._BATCH.value * _BATCHES.value  # pylint: disable=protected-access
  if _BATCHES.value % _SHARDS.value:
    raise app.UsageError(f"--shards={_SHARDS.value} must divide --batches={_BATCHES.value}")
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(n, dit_step.cond_dim())).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=-1, keepdims=True)  # stage-1 rows are unit vectors
  points = np.asarray(landmarks_lib.ARCFACE_TEMPLATE, np.float32)[None] + rng.normal(
      0.0, 2.0, (n, 5, 2)).astype(np.float32)
  lmk = stage2.model_landmarks(points)
  labels, indices = np.divmod(np.arange(n, dtype=np.int64), _IMAGES_PER_ID.value)
  keys = sampling.image_keys(seed, labels, indices)

  v = dit.get_variant(dit_step._VARIANT.value)  # pylint: disable=protected-access
  fr_info = dit_step.fr_info()
  model = dit_train.create_model(dit_step.stage2_config(scan_blocks=False), fr_info,
                                 dit_step.NUM_REAL)(rngs=nnx.Rngs(seed))
  dit_step.randomise_zero_init(model.dit, seed)
  tmodel = dit_step.TorchDiT(v, dit_step._PATCH.value, overlap=dit_step._OVERLAP.value,  # pylint: disable=protected-access
                             cond_scale=dit_step.cond_scale()).eval()
  dit_step.copy_into_torch(tmodel, model.dit)
  config = dit_step.stage2_config(scan_blocks=_SCAN.value)
  if _SCAN.value:  # the same weights, stacked over depth
    scanned = dit_train.create_model(config, fr_info, dit_step.NUM_REAL)(rngs=nnx.Rngs(seed))
    dit.copy_into_scanned(model.dit, scanned.dit)
    model = scanned
  schedule = schedules.make_schedule(config.diffusion.schedule, sample_bench.T)
  settings = sampling.SamplerSettings(num_steps=sample_bench._SAMPLE_STEPS.value, eta=0.0,  # pylint: disable=protected-access
                                      spacing=sample_bench._SPACING.value, prediction="v")  # pylint: disable=protected-access
  graphdef, params, rest = nnx.split(model, stage2.TRAINABLE, ...)  # as the train state
  generator = sampling.Generator(graphdef, schedule, settings, batch_size=b,
                                 per_example_keys=True)
  drawer = _drawer(generator, params, rest, sample_bench._GUIDANCE.value)  # pylint: disable=protected-access
  bar = _NoBar()

  def jax_draw(start: int = 0, stop: int = n) -> np.ndarray:
    return drawer._sample(rows[start:stop], lmk[start:stop], keys[start:stop], bar)  # pylint: disable=protected-access

  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()
  t_x = nchw(initial_noise(keys))
  t_lmk, t_rows = nchw(lmk), torch.from_numpy(rows)

  def torch_draw(start: int = 0, stop: int = n) -> np.ndarray:
    out = np.empty((stop - start,) + IMAGE, np.uint8)
    for s in range(start, stop, b):
      e = min(s + b, stop)
      out[s - start:e - start] = sample_bench.torch_sample(tmodel, t_x[s:e], t_lmk[s:e],
                                                           t_rows[s:e]).numpy()
    return out

  r: dict[str, Any] = {"params": sum(q.numel() for q in tmodel.parameters()),
                       "tokens": (dit_step.INPUT_SIZE // dit_step._PATCH.value) ** 2,  # pylint: disable=protected-access
                       "hidden": v.hidden, "depth": v.depth, "heads": v.heads, "images": n}
  first = [np.asarray(a[:b]) for a in (rows, lmk, keys)]
  t0 = time.perf_counter()
  jax.block_until_ready(generator.sample(params, rest, *first,
                                         np.float32(sample_bench._GUIDANCE.value)))  # pylint: disable=protected-access
  r["jax_first_call_s"] = time.perf_counter() - t0
  # Warm-up runs of both sides; their images are the correctness check.
  jimg = jax_draw().astype(np.int32)
  timg = torch_draw().astype(np.int32)
  r["max_level_diff"] = int(np.max(np.abs(jimg - timg)))
  r["frac_differing"] = float(np.mean(jimg != timg))
  r["image_std"] = float(np.std(jimg / 127.5 - 1.0))
  print(f"generation: {n} images, std {r['image_std']:.3f} ([-1, 1] scale), max |jax - torch| "
        f"{r['max_level_diff']} uint8 levels, {100 * r['frac_differing']:.3f}% of values differ")
  assert r["max_level_diff"] <= AGREE_LEVELS, (
      f"generator and torch reference disagree: {r['max_level_diff']} uint8 levels")

  reps = sample_bench._REPEATS.value  # pylint: disable=protected-access
  runs = {"jax": jax_draw, "torch": torch_draw}
  for side, fn in runs.items():
    r[f"{side}_times"], r[f"{side}_cores"] = cpu_threads.time_calls(fn, reps)
    r[f"{side}_s"] = float(np.median(r[f"{side}_times"]))
    r[f"{side}_ips"] = n / r[f"{side}_s"]
  r["ratio"] = r["torch_s"] / r["jax_s"]
  if _ENCODE.value:
    images = jimg.astype(np.uint8)
    times, _ = cpu_threads.time_calls(
        lambda: [store.encode_image(im, "png") for im in images], reps)
    r["encode_ips"] = n / float(np.median(times))
    r["png_bytes"] = float(np.mean([len(store.encode_image(im, "png")) for im in images]))
    for side, fn in runs.items():
      times, r[f"{side}_enc_cores"] = cpu_threads.time_calls(
          lambda fn=fn: _with_encoding(fn, n, _SHARDS.value), reps)
      r[f"{side}_enc_s"] = float(np.median(times))
      r[f"{side}_enc_ips"] = n / r[f"{side}_enc_s"]
    r["ratio_enc"] = r["torch_enc_s"] / r["jax_enc_s"]
  r.update(cpu_threads.environment(torch.get_num_threads()))
  return r


# ------------------------------------------------------------------ search


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  """`[n, d]` float32 Gaussian rows scaled to unit length."""
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def agreement(queries: np.ndarray, gallery: np.ndarray, sims: np.ndarray, index: np.ndarray,
              ref_sims: np.ndarray, ref_index: np.ndarray) -> dict[str, float]:
  """How a top-k result `(sims, index)` `[N, k]` agrees with a reference one.

  Returns:
    `top1_equal` (fraction of queries with the same top-1 row), `tie_gap` (largest float64
    |sim(ours) - sim(reference)| of the two top-1 rows where they differ: 0 when all agree;
    near 0 when only near-ties differ), `recall` (fraction of the reference's top-k rows in
    ours) and `sim_diff` (largest |sims - ref_sims| at any rank).
  """
  same = index[:, 0] == ref_index[:, 0]
  gap = 0.0
  if not same.all():
    q = queries[~same].astype(np.float64)
    exact = lambda idx: np.einsum("nd,nd->n", q, gallery[idx[~same, 0]].astype(np.float64))
    gap = float(np.max(np.abs(exact(index) - exact(ref_index))))
  recall = float(np.mean((ref_index[:, :, None] == index[:, None, :]).any(-1)))
  return {"top1_equal": float(np.mean(same)), "tie_gap": gap, "recall": recall,
          "sim_diff": float(np.max(np.abs(sims - ref_sims)))}


def search_part() -> list[dict[str, Any]]:
  """Queries/s of `search.Searcher` (bf16 and f32 products) and `faiss.IndexFlatIP` per k."""
  faiss = _faiss()
  faiss.omp_set_num_threads(dit_step._THREADS.value)  # pylint: disable=protected-access
  rng = np.random.default_rng(dit_step._SEED.value + 2)  # pylint: disable=protected-access
  gallery = unit_rows(rng, _GALLERY.value, _DIM.value)
  queries = unit_rows(rng, _QUERIES.value, _DIM.value)
  reps, nq = _SEARCH_REPEATS.value, _QUERIES.value

  def faiss_index():
    index = faiss.IndexFlatIP(_DIM.value)
    index.add(gallery)
    return index

  setup: dict[str, float] = {}
  t0 = time.perf_counter()
  index = faiss_index()
  setup["faiss"] = time.perf_counter() - t0
  sides: dict[str, Any] = {}  # name -> Searcher, or faiss's search of k
  for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    t0 = time.perf_counter()
    searcher = search.Searcher(gallery, dtype=dtype)
    setup[name] = time.perf_counter() - t0
    sides[name] = searcher
  sides["faiss"] = lambda k: index.search(queries, k)

  out = []
  for k in (int(x) for x in _KS.value):
    ref = None
    for name in ("faiss", "bfloat16", "float32"):
      fn = sides[name] if name == "faiss" else (lambda k, s=sides[name]: s(queries, k))
      t0 = time.perf_counter()
      sims, idx = fn(k)  # warm-up (ours: compiles for this k)
      row: dict[str, Any] = {"k": k, "side": name, "setup_s": setup[name],
                             "first_s": time.perf_counter() - t0}
      if name == "faiss":
        ref = (np.asarray(sims), np.asarray(idx))
      else:
        row.update(agreement(queries, gallery, sims, idx, *ref))
        print(f"search k={k} {name}: top-1 equal {100 * row['top1_equal']:.3f}%, near-tie gap "
              f"{row['tie_gap']:.2e}, recall@{k} {row['recall']:.5f}, max |sim diff| "
              f"{row['sim_diff']:.2e}")
        assert row["tie_gap"] <= SIM_TOL, f"{name} top-1 differs beyond a near-tie: {row}"
        assert row["sim_diff"] <= SIM_TOL, f"{name} similarities differ from faiss: {row}"
      row["times"], row["cores"] = cpu_threads.time_calls(lambda fn=fn, k=k: fn(k), reps)
      row["s"] = float(np.median(row["times"]))
      row["qps"] = nq / row["s"]
      out.append(row)
    faiss_row = next(x for x in out if x["k"] == k and x["side"] == "faiss")
    for x in out:
      if x["k"] == k:
        x["ratio"] = faiss_row["s"] / x["s"]
    # One-shot costs, once each: gallery placement + compile + search vs index + add + search.
    t0 = time.perf_counter()
    search.nearest(queries, gallery, k)
    oneshot_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    faiss_index().search(queries, k)
    oneshot_faiss = time.perf_counter() - t0
    for x in out:
      if x["k"] == k and x["side"] in ("bfloat16", "faiss"):
        x["oneshot_s"] = oneshot_ours if x["side"] == "bfloat16" else oneshot_faiss
  return out


# ------------------------------------------------------------------ report


def _gen_markdown(r: dict[str, Any]) -> list[str]:
  secs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  b, nb, n = dit_step._BATCH.value, _BATCHES.value, r["images"]  # pylint: disable=protected-access
  steps = sample_bench._SAMPLE_STEPS.value  # pylint: disable=protected-access
  reps = sample_bench._REPEATS.value  # pylint: disable=protected-access
  lines = [
      f"### Generation: {nb} batches of {b} images (`Drawer._sample`) vs PyTorch + diffusers",
      "",
      f"DiT-{dit_step._VARIANT.value} (hidden {r['hidden']}, depth {r['depth']}, "  # pylint: disable=protected-access
      f"{r['heads']} heads, {r['params'] / 1e6:.2f} M parameters, random weights), patch "
      f"{dit_step._PATCH.value} ({r['tokens']} tokens), output_overlap "  # pylint: disable=protected-access
      f"{dit_step._OVERLAP.value}, {dit_step.in_channels()} input channels, "  # pylint: disable=protected-access
      f"{dit_step.cond_dim()}-d unit rows, JAX blocks "
      f"{'`scan_blocks=True`' if _SCAN.value else 'unrolled'}, float32; {steps}-step DDIM "
      f"(eta 0, `{sample_bench._SPACING.value}`, v-prediction, x0 clipped), guidance "  # pylint: disable=protected-access
      f"{sample_bench._GUIDANCE.value:g} at every step (a DiT call on {2 * b} per step). "  # pylint: disable=protected-access
      f"Median of {reps} timed run(s) of all {n} images after 1 warm-up run; torch "
      f"{torch.__version__}, diffusers {diffusers.__version__}, {r['torch_threads']} torch "
      f"threads, process pinned to {r['affinity']} CPU(s) (`XLA_FLAGS`={r['xla_flags']!r}).",
      "",
      "| | JAX (`sampling.Generator(per_example_keys=True)` via `task.Drawer._sample`) | "
      "PyTorch `TorchDiT` + diffusers `DDIMScheduler` |",
      "|---|---:|---:|",
      f"| first call s (trace + compile + 1 batch) | {r['jax_first_call_s']:.1f} | - |",
      f"| {n} images s, median | **{r['jax_s']:.2f}** | **{r['torch_s']:.2f}** |",
      f"| timed runs s | {secs(r['jax_times'])} | {secs(r['torch_times'])} |",
      f"| cores used (process CPU s / wall s) | {r['jax_cores']:.2f} | {r['torch_cores']:.2f} |",
      f"| images / s | **{r['jax_ips']:.2f}** | **{r['torch_ips']:.2f}** |",
  ]
  if "encode_ips" in r:
    lines += [
        f"| images / s, + PNG encoding on a background thread ({_SHARDS.value} shards) | "
        f"{r['jax_enc_ips']:.2f} | {r['torch_enc_ips']:.2f} |",
        f"| cores used, with encoding | {r['jax_enc_cores']:.2f} | {r['torch_enc_cores']:.2f} |",
    ]
  lines += [
      "",
      f"torch time / JAX time = **{r['ratio']:.2f}** (> 1: JAX faster)"
      + (f"; with encoding {r['ratio_enc']:.2f}." if "encode_ips" in r else "."),
      "",
      "Notes:",
      "",
      "* Same weights, same x_T (each image's from `split(image_key)[0]`, recomputed for "
      "torch) and landmark images: the uint8 images agree to max |JAX - torch| = "
      f"{r['max_level_diff']} level(s) ({100 * r['frac_differing']:.3f}% of values differ; "
      f"asserted <= {AGREE_LEVELS}; image std {r['image_std']:.2f} on the [-1, 1] scale).",
      "* The JAX side draws x_T from the per-image keys inside its timed calls and overlaps "
      "each batch's device→host copy with the next batch; torch gets x_T precomputed (a "
      "negligible cost next to the DiT calls) and is synchronous.",
  ]
  if "encode_ips" in r:
    lines.append(
        f"* PNG encoding alone (`store.encode_image`, zlib 6, one thread): "
        f"{r['encode_ips']:.0f} images / s, {r['png_bytes'] / 1024:.1f} KiB / image (random "
        "weights: noisier images than a trained model's, so larger files).")
  return lines


def _search_markdown(rows: list[dict[str, Any]]) -> list[str]:
  nq, ng, d = _QUERIES.value, _GALLERY.value, _DIM.value
  names = {"faiss": "`faiss.IndexFlatIP` (float32)",
           "bfloat16": "ours: `search.Searcher`, bfloat16 products + float32 rescoring "
                       "(default)",
           "float32": "ours: `search.Searcher(dtype=float32)`"}
  fmt = lambda x, spec: "" if x is None else format(x, spec)
  lines = [
      f"### Audit search: {nq} queries x {ng} gallery rows, {d}-d unit vectors, exact top-k",
      "",
      f"faiss {_faiss().__version__}, {dit_step._THREADS.value} OpenMP threads; median of "  # pylint: disable=protected-access
      f"{_SEARCH_REPEATS.value} timed search(es) after 1 warm-up with the gallery placed.",
      "",
      "| k | search | gallery setup s | first search s | search s, median | cores used | "
      "queries / s | faiss time / this | top-1 equal | recall@k | max \\|Δsim\\| | "
      "one-shot s |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for x in rows:
    lines.append(
        f"| {x['k']} | {names[x['side']]} | {x['setup_s']:.3f} | {x['first_s']:.3f} | "
        f"**{x['s']:.3f}** | {x['cores']:.2f} | **{x['qps']:.0f}** | {x['ratio']:.2f} | "
        f"{fmt(100 * x['top1_equal'] if 'top1_equal' in x else None, '.3f')}"
        f"{'%' if 'top1_equal' in x else ''} | {fmt(x.get('recall'), '.5f')} | "
        f"{fmt(x.get('sim_diff'), '.1e')} | {fmt(x.get('oneshot_s'), '.3f')} |")
  lines += [
      "",
      "Notes:",
      "",
      "* Agreement is against faiss: top-1 rows may differ only on near-ties (the largest "
      "float64 similarity gap between differing top-1 rows, max "
      f"{max((x['tie_gap'] for x in rows if 'tie_gap' in x), default=0.0):.1e}, and the "
      f"largest similarity difference at any rank are asserted <= {SIM_TOL:g}).",
      "* \"gallery setup\": ours casts, pads and places the gallery (`Searcher(...)`); faiss "
      "builds the index and adds the rows. \"first search\" includes our compile for that k. "
      "\"one-shot\": `search.nearest(queries, gallery, k)` (setup + compile + search, bfloat16 "
      "row) vs `IndexFlatIP` + `add` + `search` (faiss row), once each.",
  ]
  return lines


def to_markdown(info: dict[str, Any], gen: dict[str, Any] | None,
                srch: list[dict[str, Any]] | None) -> str:
  """The BENCHMARKS.md section (heading included)."""
  dev = jax.devices()[0]
  lines = dp.section_header(SECTION, "benchmarks.generate", info) + [
      f"JAX device: {dev.platform} ({dev.device_kind}). Shared machine: see the load averages.",
      "",
  ]
  if gen is not None:
    lines += _gen_markdown(gen) + [""]
  if srch is not None:
    lines += _search_markdown(srch)
  return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if dit_step._THREADS.value != cpu_threads.THREADS_EARLY:  # pylint: disable=protected-access
    raise app.UsageError("--threads must be given as --threads=N.")
  parts = set(_PARTS.value)
  if not parts or parts - {"generation", "search"}:
    raise app.UsageError(f"--parts={','.join(_PARTS.value)}: choose from generation, search")
  if "search" in parts:
    _faiss()  # fail before the generation part runs
  if _QUICK.value:
    for name, value in _QUICK_VALUES.items():
      if not flags.FLAGS[name].present:
        setattr(flags.FLAGS, name, value)
  info = dp.machine()
  gen = generation() if "generation" in parts else None
  srch = search_part() if "search" in parts else None
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  if gen is not None:
    print(f"generation: jax {gen['jax_ips']:.2f} img/s, torch {gen['torch_ips']:.2f} img/s; "
          f"torch/jax = {gen['ratio']:.2f}")
  for x in srch or []:
    print(f"search k={x['k']} {x['side']}: {x['qps']:.0f} queries/s "
          f"(faiss time / this = {x['ratio']:.2f})")
  section = to_markdown(info, gen, srch)
  print(section)
  if dit_step._WRITE.value and flags.FLAGS.output:  # pylint: disable=protected-access
    dp.write_output(flags.FLAGS.output, section, SECTION)
  if flags.FLAGS.json:  # the figures, for a caller (benchmarks/run.py)
    dp.write_json(flags.FLAGS.json, {"machine": info, "generation": gen, "search": srch})


if __name__ == "__main__":
  app.run(main)
