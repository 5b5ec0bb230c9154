"""The `quality` task: one row of the generator's yardstick table (`configs/quality.py`).

Usefulness is what an FR model learns from a generated set: the `fr` recipe of the config
trained on `num_ids` generated identities × `images_per_id` images from a generation run's
ImageFolder export, against the same recipe on as many real procedural identities, both
verified on the same held-out procedural pairs (the fr recipe's own). The ratio of the two
accuracies is the paper's "synthetic vs real" comparison at demo scale. Beside it the row
carries what the generation run measured under its independent encoder (realism, identity
consistency, separability, diversity, each beside the same figure on real data) and the
stage-2 and sampler settings, so every change to the generator is judged by the same figures.

`fr_seeds` repeats both runs under each FR seed (`fr.train.seed`: initialisation and data
order): the figure moves by about 3 points between seeds at demo size (README "Generator
quality"), so a lever is judged by the mean ± std over seeds, and the ratio is taken per
seed (generated and real under the same seed) before it is averaged.

Writes into the workdir: `real/` (the real baseline's fr run under the recipe's own seed,
reused while its config is unchanged; `real_seed<S>/` under another seed S),
`rows/<name>/{data,fr,fr_seed<S>,sheet.png,row.json}` and the table `quality.json` /
`quality.md`.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from vigface_jax import config_lib
from vigface_jax import metrics as metrics_lib
from vigface_jax import preemption
from vigface_jax import tasks
from vigface_jax.data import faces
from vigface_jax.generate import report

REQUIRED_FIELDS = ("generated.workdir",)
CONTROLS = ("none", "shuffled_labels")
ACCURACY = "verify/procedural/accuracy"
GENERATE_COMMAND = ("python -m vigface_jax.main --config=configs/generate.py:demo "
                    "--config.stage1.workdir=... --config.stage2.workdir=... --workdir=<dir>")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a quality config once, the fr recipe's by its own task (ConfigError)."""
  config_lib.validate_parallelism(config)
  f = config_lib.Fields(config, "")
  f.sub("generated").str("workdir")
  f.str("name", optional=True)
  f.str("note")
  f.int("num_ids", 2)
  f.int("images_per_id", 2)
  f.choice("control", CONTROLS)
  f.int("control_seed", 0)
  f.int("real_offset", 0)
  f.int("sheet_ids", 1)
  f.int("sheet_images", 1)
  seeds = config.get("fr_seeds")
  if (not isinstance(seeds, (tuple, list)) or len(set(seeds)) != len(seeds)
      or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
    f.fail("fr_seeds", "a tuple of distinct non-negative ints (() = the recipe's own seed)",
           seeds)
  fr = config.get("fr")
  if not isinstance(fr, ml_collections.ConfigDict) or fr.get("task") != "fr":
    f.fail("fr", "an fr task config (configs/fr.py:usefulness)", fr)
  importlib.import_module(tasks.TASKS["fr"]).validate(fr)
  if fr.data.source != "procedural" or int(fr.virtual.num_virtual) != 0:
    raise config_lib.ConfigError(
        "fr must be a procedural-data recipe without virtual rows (virtual.num_virtual = 0, "
        f"data.source = 'procedural'; got {fr.data.source!r}, k = {fr.virtual.num_virtual}): "
        "the task trains it on real procedural people and on the generated images")


def choose_identities(gen: str, num_ids: int, per_id: int) -> list[list[str]]:
  """The first `num_ids` exported identities with ≥ `per_id` images: their first `per_id`
  image paths each (ConfigError naming what is missing). The export's folder and file names
  are zero-padded, so their sorted order is label and index order (`generate/export.py`)."""
  folder = os.path.join(gen, "imagefolder")
  if not os.path.isdir(folder) or not os.path.exists(os.path.join(gen, "identities.json")):
    raise config_lib.ConfigError(
        f"generated.workdir={gen}: no imagefolder export (imagefolder/ and identities.json); "
        f"a finished `{GENERATE_COMMAND}` with 'imagefolder' among config.formats writes it")
  chosen = []
  for name in sorted(os.listdir(folder)):
    d = os.path.join(folder, name)
    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    if len(files) >= per_id:
      chosen.append([os.path.join(d, f) for f in files[:per_id]])
    if len(chosen) == num_ids:
      return chosen
  raise config_lib.ConfigError(
      f"generated.workdir={gen}: only {len(chosen)} exported identities have ≥ {per_id} "
      f"images, {num_ids} are needed (num_ids, images_per_id); generate more identities")


def link_dataset(chosen: list[list[str]], root: str, control: str, seed: int) -> None:
  """An ImageFolder of symlinks to the chosen images; `shuffled_labels` deals the same
  images into the same folder sizes in a seeded random order (no identity left to learn)."""
  if os.path.isdir(root):
    shutil.rmtree(root)
  paths = [p for files in chosen for p in files]
  if control == "shuffled_labels":
    paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
  per_id = len(chosen[0])
  for i in range(len(chosen)):
    d = os.path.join(root, f"{i:04d}")
    os.makedirs(d)
    for j, src in enumerate(paths[i * per_id:(i + 1) * per_id]):
      os.symlink(os.path.abspath(src), os.path.join(d, f"{j:03d}{os.path.splitext(src)[1]}"))


def _fr_run(fr: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the fr recipe in `workdir`: a finished run of the same config is reused, a stopped
  one (preempted, killed) resumed from its checkpoints, another recipe's run replaced."""
  summary, saved = os.path.join(workdir, "summary.json"), os.path.join(workdir, "config.json")
  same = False
  if os.path.exists(saved):
    with open(saved) as fh:
      same = json.load(fh) == json.loads(json.dumps(fr.to_dict(), default=str))
  if same and os.path.exists(summary):
    with open(summary) as fh:
      logging.info("quality: reusing the finished fr run in %s", workdir)
      return json.load(fh)
  if not same and os.path.isdir(workdir):
    shutil.rmtree(workdir)  # another recipe's run: its checkpoints must not be resumed
  return tasks.run(fr, workdir)


def _json(path: str) -> dict[str, Any]:
  try:
    with open(path) as fh:
      return json.load(fh)
  except (OSError, ValueError):
    return {}


def _generated_figures(gen: str) -> dict[str, Any]:
  """What the generation run measured and how it was drawn (summary.json, config.json)."""
  summary = _json(os.path.join(gen, "summary.json"))
  config = _json(os.path.join(gen, "config.json"))
  stage2_dir = (config.get("stage2") or {}).get("workdir")
  s2 = _json(os.path.join(stage2_dir, "config.json")) if stage2_dir else {}
  model, diffusion = s2.get("model", {}), s2.get("diffusion", {})
  judge = summary.get("judge")
  m = (summary.get("metrics") or {}).get(judge or "", {})
  gen_m, real_m, realism = m.get("generated", {}), m.get("real", {}), m.get("realism", {})
  out = {"judge": judge, "stage2": {
      "workdir": stage2_dir, "variant": model.get("variant"),
      "image_size": model.get("image_size", 112), "patch_size": model.get("patch_size"),
      "prediction": diffusion.get("prediction"), "weighting": diffusion.get("weighting"),
      "steps": (s2.get("train") or {}).get("num_steps")},
      "sampler": summary.get("sampler"), "guidance": summary.get("guidance"),
      "realism_accuracy": realism.get("accuracy"), "fd": realism.get("fd")}
  for key in ("consistency/top1", "separability/nearest_other_cos_mean",
              "diversity/intra_pair_cos_mean", "diversity/yaw_std"):
    out[key] = {"generated": gen_m.get(key), "real": real_m.get(key)}
  # Per group of images ('dataset', controls); a resumed run drew none and has no rate.
  drawn = (summary.get("drawn_this_run") or {}).get("dataset")
  seconds = (summary.get("draw_seconds") or {}).get("dataset")
  if drawn and seconds:
    out["images_per_s"] = float(drawn) / float(seconds)
  return out


def write_sheet(path: str, chosen: list[list[str]], config: ml_collections.ConfigDict) -> None:
  """Generated faces (`sheet_ids` identities × `sheet_images`) above real procedural faces."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows, cols = int(config.sheet_ids), int(config.sheet_images)
  gen = [np.asarray(Image.open(p).convert("RGB"))
         for files in chosen[:rows] for p in files[:cols]]
  seed, offset = int(config.fr.data.seed), int(config.real_offset)
  real = [faces.render_face(seed, offset + i, j)[0] for i in range(rows) for j in range(cols)]
  report.contact_sheet(path, np.stack(gen), np.stack(real), rows, cols)


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
  """Mean and sample std (None for one value) of the figures, None when any is missing."""
  if not values or any(v is None for v in values):
    return None, None
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """A row's headline figures from its per-seed runs: each accuracy and the ratio as the mean
  over seeds (the ratio per seed first), their std over seeds, and the ratio above chance,
  (acc_generated − 0.5) / (acc_real − 0.5) of the means. One seed: its own figures, the
  fold std of the generated run in `accuracy_std_generated` as before."""
  out = {}
  for key in ("accuracy_generated", "accuracy_real", "ratio"):
    out[key], out[key + "_seed_std"] = _mean_std([p[key] for p in per_seed])
  out["accuracy_std_generated"] = (per_seed[0]["accuracy_std_generated"]
                                   if len(per_seed) == 1 else None)
  gen, real = out["accuracy_generated"], out["accuracy_real"]
  out["ratio_above_chance"] = (None if gen is None or real is None or real <= 0.5
                               else (gen - 0.5) / (real - 0.5))
  return out


def _fmt(value: Any, spec: str = ".3f") -> str:
  return "–" if value is None else format(value, spec)


def _spread(r: dict[str, Any], key: str, spec: str) -> str:
  """'mean ± std over seeds' where there are several, else the figure alone."""
  std = r.get(key + "_seed_std")
  return _fmt(r.get(key), spec) + ("" if std is None else f" ± {format(std, spec)}")


def _pair(d: dict[str, Any] | None, spec: str = ".3f") -> str:
  d = d or {}
  return f"{_fmt(d.get('generated'), spec)} / {_fmt(d.get('real'), spec)}"


def table(rows: list[dict[str, Any]]) -> str:
  """The markdown table of `quality.json` rows."""
  head = ("| row | stage 2 | realism: classifier acc. (0.5 = indistinguishable) / FD | "
          "consistency top-1 gen / real | nearest-other cos gen / real | intra-pair cos "
          "gen / real | FR on generated | FR on real | ratio | ratio above chance | FR seeds |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    s = r["generated"]["stage2"]
    stage2 = (f"{s.get('variant')}/{s.get('patch_size')} at {s.get('image_size')} px, "
              f"{s.get('prediction')}, {s.get('steps')} steps")
    g = r["generated"]
    lines.append(
        f"| {r['name']}{' — ' + r['note'] if r.get('note') else ''} | {stage2} | "
        f"{_fmt(g.get('realism_accuracy'))} / {_fmt(g.get('fd'))} | "
        f"{_pair(g.get('consistency/top1'))} | "
        f"{_pair(g.get('separability/nearest_other_cos_mean'))} | "
        f"{_pair(g.get('diversity/intra_pair_cos_mean'))} | "
        f"{_spread(r, 'accuracy_generated', '.2%')} | "
        f"{_spread(r, 'accuracy_real', '.2%')} | {_spread(r, 'ratio', '.1%')} | "
        f"{_fmt(r.get('ratio_above_chance'), '.1%')} | {len(r.get('seeds') or [0])} |")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the recipe on real and on generated people and adds the row to the table."""
  validate(config)
  gen = config.generated.workdir
  name = config.name or os.path.basename(os.path.normpath(gen))
  if config.control != "none":
    name = f"{name} (control: {config.control})"
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "row"
  num_ids, per_id = int(config.num_ids), int(config.images_per_id)
  chosen = choose_identities(gen, num_ids, per_id)
  row_dir = os.path.join(workdir, "rows", slug)
  os.makedirs(row_dir, exist_ok=True)

  data_dir = os.path.join(row_dir, "data")
  link_dataset(chosen, data_dir, config.control, int(config.control_seed))
  own_seed = int(config.fr.train.seed)
  per_seed = []
  for seed in tuple(config.fr_seeds) or (own_seed,):
    suffix = "" if seed == own_seed else f"_seed{seed}"
    real_fr = copy.deepcopy(config.fr)
    with real_fr.unlocked():
      real_fr.train.seed = seed
      real_fr.data.num_identities, real_fr.data.images_per_identity = num_ids, per_id
      real_fr.data.identity_offset = int(config.real_offset)
    real = _fr_run(real_fr, os.path.join(workdir, "real" + suffix))
    preemption.check(f"after the real recipe's run (seed {seed}), before the generated one")
    gen_fr = copy.deepcopy(config.fr)
    with gen_fr.unlocked():
      gen_fr.train.seed = seed
      gen_fr.data.source, gen_fr.data.path, gen_fr.data.cache = "imagefolder", data_dir, False
    generated = _fr_run(gen_fr, os.path.join(row_dir, "fr" + suffix))
    preemption.check(f"after the generated set's run (seed {seed})")
    acc_gen, acc_real = generated.get(ACCURACY), real.get(ACCURACY)
    per_seed.append({
        "seed": seed, "accuracy_generated": acc_gen, "accuracy_real": acc_real,
        "accuracy_std_generated": generated.get(ACCURACY + "_std"),
        "ratio": None if not acc_real or acc_gen is None else acc_gen / acc_real})
  write_sheet(os.path.join(row_dir, "sheet.png"), chosen, config)

  row = {"name": name, "note": config.note, "control": config.control,
         "generated_workdir": gen, "num_ids": num_ids, "images_per_id": per_id,
         "seeds": [p["seed"] for p in per_seed], "per_seed": per_seed,
         "sheet": os.path.join("rows", slug, "sheet.png"),
         "generated": _generated_figures(gen)}
  row.update(summarise(per_seed))
  metrics_lib.write_json(os.path.join(row_dir, "row.json"), row)
  path = os.path.join(workdir, "quality.json")
  rows = [r for r in _json(path).get("rows", []) if r.get("name") != name] + [row]
  metrics_lib.write_json(path, {"rows": rows})
  metrics_lib.atomic_write(os.path.join(workdir, "quality.md"), table(rows).encode())
  logging.info("quality: %s: FR on generated %.4f, on real %.4f (%d seeds)", name,
               row["accuracy_generated"] or -1, row["accuracy_real"] or -1, len(per_seed))
  return row
