r"""One entry point for the benchmarks: every hot path beside its reference, one file of figures.

    python -m benchmarks.run --suite cpu                     # rewrites BENCHMARKS.md
    python -m benchmarks.run --suite cpu --tiny --output=/tmp/bench.md   # seconds each
    python -m benchmarks.run --suite cpu --dry-run           # prints the commands, runs nothing
    python -m benchmarks.run --suite accelerator --output=benchmarks/results/gpu.md

Each benchmark is an existing script of `benchmarks/`, run as its own subprocess (one crash
loses only that benchmark) with the command line its BENCHMARKS.md section documents plus
`--output=<logs>/<name>.md --json=<logs>/<name>.json`: the script writes its section (the
`--write` mechanism) and its figures there; this driver copies the section into `--output`
(default BENCHMARKS.md, relative to the repository root) under a summary with the machine,
versions and date: per benchmark its headline figures, the ratio reference time / our time
(> 1: ours faster), peak host memory and, where the backend reports it, peak device memory.
The `cpu` suite:

* `data_pipeline`: the grain loader against a bare Python loop.
* `fr_r50`, `fr_demo` (`fr_step.py`): the stage-1 trainer's step against arcface_torch's recipe,
  IResNet-50 at 112 and `configs/fr.py:demo`'s net (`small`, 128-d, 48x48; its 800 real + 800
  virtual centres as 1,600 plain classes).
* `dit_step`: the stage-2 trainer's step against the same work in PyTorch.
* `sample`: 50-step DDIM sampling against PyTorch + diffusers.
* `generate`: generation images/s, and the audit search against faiss-cpu's exact
  `IndexFlatIP` if `import faiss` works (else generation only, and the summary says why).
* `compile`: the demo configs' compile-only dry runs (`--config.dry_run=True`), each twice in
  one fresh persistent compilation cache: cold (empty: the reference) and warm.

The `accelerator` suite (`benchmarks/accelerator.sh`) is `fr_r50`, `dit_b4` (DiT-B/4) and
`generate` (its generation part times the sampler `sample` does, as the generate task drives
it) at sizes meant for a few minutes, `--threads` = the host's usable CPUs, and adds the model
FLOP utilisation of the training steps (XLA's cost-analysis FLOPs / step time / the device's
dense bf16 peak in `PEAK_BF16_FLOPS`; n/a elsewhere). Its training steps run `--dtype=bfloat16`
(bf16 compute, float32 parameters; torch under `torch.autocast`), PyTorch on the GPU when torch
sees one; the summary says what each side ran on, from the scripts' JSON (`generate`: float32,
PyTorch on the host CPU).

`--tiny`: every benchmark at its smallest sizes (tests). `--only=a,b`: some of them.
`--append=NAME:ARG`: ARG added to NAME's command line (later flags win). `--note=TEXT`: a
line for the summary (accelerator.sh: a CUDA torch wheel that failed to install). Peak host
memory is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of a small launcher that runs only
that benchmark (the largest resident set of its process and the descendants it waited for).
`--timeout` bounds each benchmark, `--budget` the whole run (a benchmark that would start
after it is skipped). A failed, timed-out or skipped benchmark is reported in the output with
its error's last line and the exit status is 1; an unknown name exits 2 and writes nothing.

argparse, not absl: the benchmark modules this imports define absl flags of their own
(`--output`, `--json`) for their own command lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

_REPO = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = "## Benchmark suite"
FAILED_NOTE = "> **The last suite run of this benchmark failed**"
# Dense bfloat16 FLOP/s of one chip, by `jax.devices()[0].device_kind` substring (first match;
# None: a known kind whose peak is not in this table).
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H200", 989e12), ("H100 PCIe", None), ("H100 NVL", None), ("H100", 989e12),  # H100 SXM
    ("A100", 312e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v4 lite", None), ("TPU v4", 275e12))


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of `device_kind` from `PEAK_BF16_FLOPS`, or None if unknown."""
  for key, peak in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


# ---------------------------------------------------------------------------- the suites


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark: a script of `benchmarks/` (or the compile dry runs) and its sizes."""

  name: str
  heading: str  # the section it owns in the output file
  module: str  # `benchmarks.<module>`; "compile": the dry runs, run from here
  args: tuple[str, ...]  # full size (BENCHMARKS.md's documented command line)
  tiny: tuple[str, ...]  # smallest sizes
  note: str = ""  # what the summary should say about it


# IResNet `small`: with `tiny` (8..64 channels) torch 2.13.0+cpu's backward crashes (SIGSEGV).
# Batch 4: BatchNorm over two samples turns bf16 rounding into step-1 loss differences near
# fr_step's 2% bf16 tolerance (1.9% with nnx.BatchNorm, 2.8% with layers.BatchNorm at 48 px;
# 0.1% at 4 for both).
_FR_TINY = ("--variant=small", "--batch=4", "--num_classes=8", "--steps=1")
_DIT_TINY = ("--variant=tiny", "--fr_config=tiny", "--batch=2", "--steps=1", "--write")
# configs/dit.py:demo's geometry (48 px, 6×6 patches, margin 1, blur σ 2.6 / 6.9 at 48).
_DIT_DEMO = ("--image_size=48", "--patch_size=6", "--output_overlap=1", "--landmark_blur=2.6,6.9")
# configs/dit.py's default: DiT-B/8 at 112, v-prediction, the landmark image alone, no margin.
_DIT_B8 = ("--variant=B", "--patch_size=8", "--output_overlap=0", "--landmark_blur=",
           "--prediction=v")
_SAMPLE = ("--variant=small", "--patch_size=16", "--output_overlap=4", "--landmark_blur=6,16",
           "--batch=16", "--sample_steps=50", "--write")
_SAMPLE_TINY = ("--variant=tiny", "--fr_config=tiny", "--batch=1", "--sample_steps=2",
                "--repeats=1", "--write")
_GENERATE = ("--batch=16", "--batches=4", "--sample_steps=50", "--queries=20000",
             "--gallery=100000", "--dim=128", "--ks=1,10", "--write")
_GENERATE_TINY = ("--quick", "--variant=tiny", "--fr_config=tiny", "--write")
_FR_HEADING = "## Stage-1 training step (IResNet + ArcFace)"
_BF16 = ("--dtype=bfloat16",)  # the accelerator suite's training steps
# The compile benchmark's dry runs: (config, extra flags), full size and tiny.
COMPILE_CONFIGS = (("configs/fr.py:demo", ()),
                   ("configs/dit.py:demo", ("--config.model.num_real=800",)))
COMPILE_CONFIGS_TINY = (("configs/fr.py:tiny", ()),)  # stage 2's tiny cold compile: ~25 s more

CPU_SUITE = (
    Benchmark("data_pipeline", "## Data pipeline (procedural faces)", "data_pipeline",
              ("--worker_counts=0,1,2",),
              ("--worker_counts=0", "--num_batches=1", "--batch_size=4", "--warmup_batches=1",
               "--read_threads=", "--render_images=4", "--repeats=1", "--rounds=1",
               "--num_identities=4", "--images_per_identity=4")),
    Benchmark("fr_r50", _FR_HEADING, "fr_step",
              ("--variant=r50", "--batch=8", "--num_classes=2000", "--steps=5"), _FR_TINY),
    Benchmark("fr_demo", _FR_HEADING + ", demo net", "fr_step",
              ("--variant=small", "--input_size=48", "--embed_dim=128", "--batch=64",
               "--num_classes=1600", "--steps=5"),
              _FR_TINY + ("--input_size=48", "--embed_dim=128"),
              "images at the net's 48x48 input (the demo resizes its 112 crops in the step)"),
    Benchmark("dit_step", "## DiT training step", "dit_step",
              ("--batch=32", "--steps=5", "--write"), _DIT_TINY),
    Benchmark("dit_demo", "## DiT training step, the demo's DiT (48 px)", "dit_step",
              _DIT_DEMO + ("--batch=32", "--steps=5", "--write"), _DIT_TINY + _DIT_DEMO),
    Benchmark("dit_b8", "## DiT training step, DiT-B/8 at 112 (the paper's)", "dit_step",
              _DIT_B8 + ("--fr_config=default", "--batch=4", "--steps=2", "--write"),
              _DIT_TINY + _DIT_B8),
    Benchmark("sample", "## DiT sampling (DDIM + guidance)", "sample", _SAMPLE, _SAMPLE_TINY),
    Benchmark("generate", "## Stage-3 generation and audit search", "generate", _GENERATE,
              _GENERATE_TINY),
    Benchmark("compile", "## Compile time (demo configs)", "compile", (), ()),
)
ACCELERATOR_SUITE = (
    Benchmark("fr_r50", _FR_HEADING, "fr_step",
              ("--variant=r50", "--batch=64", "--num_classes=2000", "--steps=5") + _BF16,
              _FR_TINY + _BF16),
    Benchmark("dit_b4", "## DiT training step (DiT-B/4)", "dit_step",
              ("--variant=B", "--patch_size=4", "--batch=16", "--steps=3", "--write") + _BF16,
              _DIT_TINY + _BF16),
    Benchmark("generate", "## Stage-3 generation and audit search", "generate",
              _GENERATE + ("--repeats=1", "--search_repeats=2"), _GENERATE_TINY),
)
SUITES = {"cpu": CPU_SUITE, "accelerator": ACCELERATOR_SUITE}
# Scripts that pin themselves to `--threads` CPUs (benchmarks/cpu_threads.py).
_THREADED = ("fr_step", "dit_step", "sample", "generate")


@dataclasses.dataclass
class Run:
  """One subprocess: its command line, extra environment, and where its output goes."""

  argv: list[str]
  env: dict[str, str]
  log: pathlib.Path  # stdout
  stderr: pathlib.Path
  md: pathlib.Path | None = None  # the section a script writes (--output)
  json: pathlib.Path | None = None  # its figures (--json)
  workdir: pathlib.Path | None = None  # a dry run's --workdir (compile)
  config: str = ""  # a dry run's config (compile)


def faiss_available() -> tuple[bool, str]:
  """Whether `import faiss` works here, and the reason if it does not."""
  try:
    importlib.import_module("faiss")
  except Exception as e:  # pylint: disable=broad-except  # a broken install counts as absent
    return False, f"{type(e).__name__}: {e}"
  return True, ""


def plan(bench: Benchmark, suite: str, tiny: bool, logs: pathlib.Path,
         extra: list[str], faiss_ok: bool = True) -> list[Run]:
  """The subprocesses that make `bench`."""
  env: dict[str, str] = {}
  if bench.module == "compile":
    runs = []
    for config, flags in (COMPILE_CONFIGS_TINY if tiny else COMPILE_CONFIGS):
      tag = pathlib.Path(config.split(":")[0]).stem + "_" + config.split(":")[1]
      # Every compile cached (min time 0), so the warm run reads what the cold one compiled.
      env = {"JAX_COMPILATION_CACHE_DIR": str(logs / f"compile_cache_{tag}"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
      for phase in ("cold", "warm"):
        workdir = logs / f"compile_{tag}_{phase}"
        argv = [sys.executable, "-m", "vigface_jax.main", f"--config={config}",
                "--config.dry_run=True", *flags, f"--workdir={workdir}", *extra]
        runs.append(Run(argv, dict(env), logs / f"compile_{tag}_{phase}.log",
                        logs / f"compile_{tag}_{phase}.err", workdir=workdir, config=config))
    return runs
  args = list(bench.tiny if tiny else bench.args)
  if suite == "accelerator" and bench.module in _THREADED:
    args.append(f"--threads={_usable_cpus()}")
  if bench.module == "generate" and not faiss_ok:
    args.append("--parts=generation")
  md, js = logs / f"{bench.name}.md", logs / f"{bench.name}.json"
  argv = [sys.executable, "-m", f"benchmarks.{bench.module}", *args, *extra, f"--output={md}",
          f"--json={js}"]
  return [Run(argv, env, logs / f"{bench.name}.log", logs / f"{bench.name}.err", md, js)]


def _usable_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def command_line(run: Run) -> str:
  """`run` as a shell command line (its extra environment first)."""
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items())
  return (env + " " if env else "") + shlex.join(["python"] + run.argv[1:])


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Outcome:
  """What one subprocess did."""

  returncode: int | None  # None: not run
  wall_s: float = 0.0
  maxrss_bytes: int = 0
  error: str = ""  # the last line of its error, empty when it succeeded


def _error_line(run: Run, returncode: int) -> str:
  """The last informative stderr line (a traceback's exception, a fatal error, SystemExit)."""
  try:
    lines = [l.strip() for l in run.stderr.read_text(errors="replace").splitlines() if l.strip()]
  except OSError:
    lines = []
  fatal = [l for l in lines if l.startswith("Fatal Python error")]
  lines = [l for l in lines if not l.startswith(("Extension modules:", "Current thread",
                                                 "Thread 0x", "File \"", "Pass --helpshort"))]
  last = fatal[-1] if fatal else (lines[-1] if lines else "no error output")
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"killed by {name} ({last})"
  return last


# Runs the benchmark as its child and writes "<exit status> <RUSAGE_CHILDREN ru_maxrss KiB>":
# a small parent, because an exec'd child's ru_maxrss starts at its parent's resident set (the
# kernel records the replaced address space's high-water mark), and this driver's is large.
_LAUNCHER = ("import resource, subprocess, sys\n"
             "status = subprocess.call(sys.argv[2:])\n"
             "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
             "open(sys.argv[1], 'w').write(f'{status} {rss}')\n"
             "sys.exit(status if status >= 0 else 128 - status)\n")


def execute(run: Run, timeout: float | None) -> Outcome:
  """Runs `run` to completion or `timeout` seconds (then its process group is killed)."""
  env = dict(os.environ, **run.env)
  env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  usage = run.log.with_suffix(".rusage")
  usage.unlink(missing_ok=True)
  t0 = time.perf_counter()
  with open(run.log, "wb") as out, open(run.stderr, "wb") as err:
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(usage), *run.argv],
                            stdout=out, stderr=err, env=env, cwd=_REPO,
                            start_new_session=True)  # its own group: a timeout kills workers too
  timed_out = False
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:  # also on KeyboardInterrupt / SIGTERM: leave no benchmark running
    for sig in (signal.SIGTERM, signal.SIGKILL):
      try:
        os.killpg(proc.pid, sig)  # the launcher, the benchmark and its workers
      except ProcessLookupError:
        break
      try:
        proc.wait(10)
        os.killpg(proc.pid, 0)  # raises once the whole group is gone
      except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
  wall = time.perf_counter() - t0
  try:
    status, rss = map(int, usage.read_text().split())
  except (OSError, ValueError):  # killed before it could write
    status, rss = proc.returncode, 0
  outcome = Outcome(status, wall, rss * 1024)
  if timed_out:
    outcome.error = f"timed out after {timeout:.0f} s"
    outcome.returncode = 124 if not status or status > 0 else status
  elif status:
    outcome.error = _error_line(run, status)
  return outcome


# ---------------------------------------------------------------------------- figures


@dataclasses.dataclass
class Headline:
  """One row of a benchmark's figures: ours beside the reference."""

  figure: str
  ours: str
  reference: str
  ratio: float | None  # reference time / our time (> 1: ours faster)
  flops: float = 0.0  # per step (training steps), for the MFU
  step_s: float = 0.0


def _fr(f: dict[str, Any]) -> list[Headline]:
  r, b = f["figures"], f["batch"]
  return [Headline("training step, images / s", f"{b / r['jax_s']:.2f}",
                   f"{b / r['torch_s']:.2f} (PyTorch)", r["ratio"],
                   r.get("jax_flops", 0.0), r["jax_s"])]


def _dit(f: dict[str, Any]) -> list[Headline]:
  r, b = f["figures"], f["batch"]
  return [Headline(f"training step ({name}), images / s", f"{b / r[f'{side}_s']:.2f}",
                   f"{b / r['torch_s']:.2f} (PyTorch)", r[ratio], r.get(f"{side}_flops", 0.0),
                   r[f"{side}_s"])
          for name, side, ratio in (("blocks unrolled", "jax", "ratio"),
                                    ("`scan_blocks`", "scan", "ratio_scan"))]


def _sample(f: dict[str, Any]) -> list[Headline]:
  r = f["figures"]
  return [Headline("DDIM sampling, images / s", f"{r['jax_ips']:.2f}",
                   f"{r['torch_ips']:.2f} (PyTorch + diffusers)", r["ratio"])]


def _generate(f: dict[str, Any]) -> list[Headline]:
  rows = []
  gen = f.get("generation")
  if gen:
    rows.append(Headline("generation, images / s", f"{gen['jax_ips']:.2f}",
                         f"{gen['torch_ips']:.2f} (PyTorch + diffusers)", gen["ratio"]))
    if "ratio_enc" in gen:
      rows.append(Headline("generation + PNG encoding, images / s", f"{gen['jax_enc_ips']:.2f}",
                           f"{gen['torch_enc_ips']:.2f}", gen["ratio_enc"]))
  for x in f.get("search") or []:
    if x["side"] == "bfloat16":
      ref = next(y for y in f["search"] if y["k"] == x["k"] and y["side"] == "faiss")
      rows.append(Headline(f"audit search k={x['k']}, queries / s", f"{x['qps']:.0f}",
                           f"{ref['qps']:.0f} (faiss-cpu `IndexFlatIP`)", x["ratio"]))
  return rows


def _data_pipeline(f: dict[str, Any]) -> list[Headline]:
  rows = f["pipelines"]
  ref = next(r for r in rows if r["workers"] is None)
  ours = max((r for r in rows if r["name"].startswith("ours")), key=lambda r: r["images_per_s"])
  return [Headline(f"input pipeline ({ours['workers']} grain workers), images / s",
                   f"{ours['images_per_s']:.0f}", f"{ref['images_per_s']:.0f} (Python loop)",
                   ours["images_per_s"] / ref["images_per_s"])]


HEADLINES: dict[str, Callable[[dict[str, Any]], list[Headline]]] = {
    "fr_step": _fr, "dit_step": _dit, "sample": _sample, "generate": _generate,
    "data_pipeline": _data_pipeline}


@dataclasses.dataclass
class Result:
  """A benchmark's runs, section and figures."""

  bench: Benchmark
  runs: list[Run]
  outcomes: list[Outcome] = dataclasses.field(default_factory=list)
  section: str = ""
  headlines: list[Headline] = dataclasses.field(default_factory=list)
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def error(self) -> str:
    if not self.outcomes:
      return "not run"
    return next((o.error for o in self.outcomes if o.error), "")

  @property
  def ok(self) -> bool:
    return len(self.outcomes) == len(self.runs) and not self.error

  @property
  def maxrss_bytes(self) -> int:
    return max((o.maxrss_bytes for o in self.outcomes), default=0)

  @property
  def wall_s(self) -> float:
    return sum(o.wall_s for o in self.outcomes)


def collect(result: Result) -> None:
  """Reads a finished script benchmark's section and figures into `result`."""
  bench, run = result.bench, result.runs[0]
  try:
    text = run.md.read_text(encoding="utf-8")
    result.figures = json.loads(run.json.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    result.outcomes[-1].error = f"exited 0 but wrote no section or figures: {e}"
    return
  section = text[text.index("\n## ") + 1:] if "\n## " in text else text
  result.section = bench.heading + section[section.index("\n"):]  # its own heading
  result.headlines = HEADLINES[bench.module](result.figures)


def collect_compile(result: Result) -> None:
  """The compile dry runs' figures (cold, warm per config) as headlines and a section body."""
  pairs = list(zip(result.runs[::2], result.runs[1::2],
                   result.outcomes[::2], result.outcomes[1::2]))
  rows = []
  for cold, warm, cold_o, warm_o in pairs:
    config = cold.config
    figs = []
    for run in (cold, warm):
      with open(run.workdir / "dry_run.json", encoding="utf-8") as f:
        figs.append(json.load(f)["dry_run"])
    programs = [("train step", figs[0], figs[1])]
    if "sampler" in figs[0]:
      programs.append(("stage-3 sampler", figs[0]["sampler"], figs[1]["sampler"]))
    for name, c, w in programs:
      result.headlines.append(Headline(
          f"`{config}` {name}: compile s, warm cache", f"{w['compile_s']:.2f}",
          f"{c['compile_s']:.2f} (empty cache)", c["compile_s"] / max(w["compile_s"], 1e-9)))
      rows.append(f"| `{config}` | {name} | {c['lower_s']:.2f} | {c['compile_s']:.2f} | "
                  f"{w['compile_s']:.2f} | {c['compile_s'] / max(w['compile_s'], 1e-9):.1f} | "
                  f"{cold_o.wall_s:.1f} / {warm_o.wall_s:.1f} |")
  tmp = str(result.runs[0].workdir.parent)
  result.figures = {"rows": rows, "commands": [command_line(r).replace(tmp, "<tmp>")
                                               for r in result.runs[::2]]}


# ------------------------------------------------------------------------------ writing


def _mib(n: int | None) -> str:
  return "n/a" if not n else f"{n / 2**20:,.0f} MiB"


def _mfu(h: Headline, device_kind: str) -> str:
  peak = peak_flops(device_kind)
  if not h.flops or not h.step_s:
    return "-"
  return "n/a" if peak is None else f"{100 * h.flops / h.step_s / peak:.1f}%"


def _device(result: Result) -> dict[str, Any]:
  return result.figures.get("device") or {}


def sides_line(result: Result) -> str:
  """What each side of a finished benchmark ran on, from its script's JSON (`train_step.sides`)."""
  r = result.figures.get("figures") or {}
  name = f"`{result.bench.name}`"
  if not result.ok:
    return f"{name}: not run or failed."
  if "torch_device" not in r:
    return (f"{name}: JAX on {_device(result).get('device_kind') or 'its device'}, its "
            "references on the host CPU (no torch-device flag; dtypes: see its section).")
  return f"{name}: {r['dtype']}; JAX on {r['jax_device']}, PyTorch on {r['torch_device']}."


def suite_rows(result: Result) -> list[str]:
  """The benchmark's rows of the summary table."""
  dev = _device(result)
  common = (f"{_mib(result.maxrss_bytes)} | {_mib(dev.get('peak_bytes_in_use'))} | "
            f"{result.wall_s:.1f} |")
  name = f"`{result.bench.name}`"
  if not result.outcomes:
    return [f"| {name} | not run (yet) | - | - | - | - | - | {common}"]
  if not result.ok:
    error = result.error.replace("|", "\\|").replace("`", "'")
    return [f"| {name} | **failed**: `{error}` | - | - | - | - | - | {common}"]
  return [f"| {name} | ok | {h.figure} | {h.ours} | {h.reference} | "
          f"{'-' if h.ratio is None else f'**{h.ratio:.2f}**'} | "
          f"{_mfu(h, dev.get('device_kind', ''))} | {common}" for h in result.headlines]


_TABLE = ("| benchmark | status | figure | ours | reference | ratio (reference time / ours) | "
          "MFU | peak host memory | peak device memory | wall s |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def section_text(result: Result, info: dict[str, Any], command: str) -> str:
  """The benchmark's section: the script's own, then its row(s) of the suite table."""
  if result.bench.module == "compile":
    from benchmarks import data_pipeline as dp  # pylint: disable=g-import-not-at-top
    lines = dp.section_header(result.bench.heading, "benchmarks.run", info)
    lines[2] = (f"Produced by `{command}` (its `compile` benchmark), which runs " + "; ".join(
        f"`{c}`" for c in result.figures["commands"]) + ", each twice: `_cold`, then the same "
        "command with `_warm` (the same cache directory).")
    lines += [
        "Each config's compile-only dry run (`--config.dry_run=True`: the trainer's own step, "
        "built by `loop.make_trainer` and compiled by `lower().compile()`, nothing initialised "
        "or read) runs twice in a fresh persistent compilation cache "
        "(`JAX_COMPILATION_CACHE_DIR`, every compile cached): cold, with the cache empty (the "
        "reference), and warm, the second run reading it. Ratio: cold / warm compile time.",
        "",
        "| config | program | lower s | compile s, empty cache | compile s, warm cache | "
        "cold / warm | process wall s, cold / warm |",
        "|---|---|---:|---:|---:|---:|---:|", *result.figures["rows"], ""]
    body = "\n".join(lines)
  else:
    body = result.section.rstrip("\n") + "\n"
  note = f"\nNote: {result.bench.note}.\n" if result.bench.note else ""
  return (body + note + f"\nSuite run: `{command}`, {info['date']}.\n\n" + "\n".join(_TABLE)
          + "\n" + "\n".join(suite_rows(result)) + "\n")


def failed_section(result: Result, old: str | None, date: str) -> str:
  """`old` (the section from an earlier run, if any) under a note that this run failed."""
  cmds = "; ".join(f"`{command_line(r)}`" for r in result.runs[:len(result.outcomes) or 1])
  note = (f"{FAILED_NOTE} ({date}): `{result.error}`. Command: {cmds}." +
          (" The figures below are from the earlier run their machine line names." if old
           else ""))
  if not old:
    return f"{result.bench.heading}\n\n{note}\n"
  lines = [l for l in old.rstrip("\n").split("\n") if not l.startswith(FAILED_NOTE)]
  while len(lines) > 1 and not lines[1].strip():
    del lines[1]
  return "\n".join([lines[0], "", note, ""] + lines[1:]) + "\n"


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def write(path: pathlib.Path, results: list[Result], finished: Result, info: dict[str, Any],
          args: Any, faiss_note: str) -> None:
  """Rewrites `finished`'s section and the summary of `path` (created if missing)."""
  from benchmarks import data_pipeline as dp  # pylint: disable=g-import-not-at-top
  command = args.command
  if not path.exists():
    header = dp._HEADER  # pylint: disable=protected-access
    if args.suite == "accelerator":
      header = f"# Accelerator benchmarks\n\nWritten by `{command}` (benchmarks/accelerator.sh).\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header, encoding="utf-8")
  if finished.ok:
    dp.write_section(path, section_text(finished, info, command), finished.bench.heading)
  else:
    old = dp.section_of(path.read_text(encoding="utf-8"), finished.bench.heading)
    dp.write_section(path, failed_section(finished, old, info["date"]), finished.bench.heading)
  kinds = sorted({_device(r).get("device_kind", "") for r in results} - {""})
  lines = dp.section_header(SUMMARY, "benchmarks.run", info)
  lines[2] = f"Produced by `{command}`."
  lines += [
      "Also: " + ", ".join(f"{d} {_version(d)}" for d in (
          "jaxlib", "flax", "torch", "diffusers", "faiss-cpu"))
      + f". JAX device: {', '.join(kinds) or 'unknown'}." + (f" {faiss_note}" * bool(faiss_note)),
      "",
      "Each benchmark's section below is its script's own (the command line it names), with its "
      "row(s) of this table. Ratio: reference time / our time (> 1: ours faster; for "
      "`compile`: cold / warm persistent cache). Peak host memory: `RUSAGE_CHILDREN` "
      "`ru_maxrss` of a launcher that ran only the benchmark. Peak device memory: "
      "`memory_stats()['peak_bytes_in_use']` of the first device where the backend reports it. "
      "MFU: XLA's cost-analysis FLOPs of one step / step time / the device's dense bf16 peak "
      "(`benchmarks/run.py` `PEAK_BF16_FLOPS`; n/a for other devices).",
  ]
  if args.suite == "accelerator":
    lines += ["", "What each side ran on (the MFU is against the bf16 peak in every case):", "",
              *(f"* {sides_line(r)}" for r in results if r.bench.module != "compile")]
  lines += [f"\nNote: {n}" for n in args.note]
  lines += ["", *_TABLE, *(row for r in results for row in suite_rows(r))]
  text = path.read_text(encoding="utf-8")
  summary = "\n".join(lines) + "\n"
  if dp.section_of(text, SUMMARY) is None and "\n## " in text:  # first, above the sections
    i = text.index("\n## ") + 1
    path.write_text(text[:i] + summary + "\n" + text[i:], encoding="utf-8")
  else:
    dp.write_section(path, summary, SUMMARY)


def machine_info(results: list[Result], date: str, load_start: Any) -> dict[str, Any]:
  """The machine line's facts: a benchmark's own `machine()` record (so this process never
  starts a backend an accelerator benchmark needs), this process's CPU counts, the run's date."""
  info = next((r.figures["machine"] for r in results if r.figures.get("machine")), None)
  if info is None:
    from benchmarks import data_pipeline as dp  # pylint: disable=g-import-not-at-top
    info = dp.machine(start_backend=False)
  return dict(info, date=date, load_average_start=load_start,
              cpu_count=os.cpu_count(), usable_cpus=_usable_cpus(),
              load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None)


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                   description=__doc__.split("\n\n")[0].strip())
  parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
  parser.add_argument("--output", default="BENCHMARKS.md",
                      help="markdown file to rewrite (relative: from the repository root)")
  parser.add_argument("--tiny", action="store_true", help="smallest sizes (tests)")
  parser.add_argument("--dry-run", action="store_true",
                      help="print every command it would run; run nothing")
  parser.add_argument("--only", default="", help="comma-separated benchmark names")
  parser.add_argument("--append", action="append", default=[], metavar="NAME:ARG",
                      help="add ARG to benchmark NAME's command line (repeatable)")
  parser.add_argument("--note", action="append", default=[], help="a summary line (repeatable)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
  parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
  parser.add_argument("--logs", default="",
                      help="directory for the benchmarks' outputs (default: a temporary one, "
                      "removed unless a benchmark failed)")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  args.command = "python -m benchmarks.run " + " ".join(  # as the output names it
      a for a in argv if not a.startswith(("--output", "--logs", "--note")))
  # A SIGTERM (e.g. `timeout`) unwinds through `execute`, which then kills the running benchmark.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  suite = {b.name: b for b in SUITES[args.suite]}
  names = [n for n in args.only.split(",") if n] or list(suite)
  extra: dict[str, list[str]] = {}
  for item in args.append:
    name, _, arg = item.partition(":")
    extra.setdefault(name, []).append(arg)
  unknown = sorted((set(names) | set(extra)) - set(suite))
  if unknown:
    print(f"benchmarks.run: unknown benchmark(s) {', '.join(unknown)} in --suite "
          f"{args.suite}; known: {', '.join(suite)}", file=sys.stderr)
    return 2
  faiss_ok, why = faiss_available()
  faiss_note = ("" if faiss_ok else f"The audit search was not run: its reference is "
                f"faiss-cpu's exact search and `import faiss` failed ({why}); "
                "`pip install faiss-cpu`.")
  if faiss_note and "generate" in names:
    print(f"benchmarks.run: {faiss_note}", flush=True)
  if args.dry_run:
    logs = pathlib.Path(args.logs or "<logs>")
  else:
    logs = pathlib.Path(args.logs or tempfile.mkdtemp(prefix="benchmarks-run-"))
  results = [Result(suite[n], plan(suite[n], args.suite, args.tiny, logs, extra.get(n, []),
                                   faiss_ok)) for n in names]
  if args.dry_run:
    print(f"# each from {_REPO} with PYTHONPATH={_REPO}")
    for result in results:
      print(f"# {result.bench.name}: {result.bench.heading[3:]}")
      for run in result.runs:
        print(command_line(run))
    return 0
  logs.mkdir(parents=True, exist_ok=True)
  output = pathlib.Path(args.output)
  output = output if output.is_absolute() else _REPO / output
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  start = time.monotonic()
  for i, result in enumerate(results, 1):
    for run in result.runs:
      left = None if args.budget is None else args.budget - (time.monotonic() - start)
      if left is not None and left < 1:
        result.outcomes.append(Outcome(None, error=f"skipped: the --budget of {args.budget:.0f} "
                                       "s was spent"))
        break
      timeout = min([t for t in (args.timeout, left) if t is not None], default=None)
      print(f"[{i}/{len(results)}] {result.bench.name}: {command_line(run)}", flush=True)
      outcome = execute(run, timeout)
      result.outcomes.append(outcome)
      if outcome.error:
        break
    if result.ok:
      try:
        (collect_compile if result.bench.module == "compile" else collect)(result)
      except (OSError, ValueError, KeyError, StopIteration, ZeroDivisionError) as e:
        result.outcomes[-1].error = f"its figures could not be read: {type(e).__name__}: {e}"
    print(f"[{i}/{len(results)}] {result.bench.name}: "
          f"{'ok' if result.ok else f'FAILED: {result.error}'} ({result.wall_s:.1f} s, "
          f"peak host memory {_mib(result.maxrss_bytes)})", *(
              f"    {h.figure}: ours {h.ours}, reference {h.reference}, ratio {h.ratio:.2f}"
              for h in result.headlines), sep="\n", flush=True)
    write(output, results, result, machine_info(results, date, load_start), args, faiss_note)
  failed = [r.bench.name for r in results if not r.ok]
  print(f"benchmarks.run: wrote {output}; " + (f"failed: {', '.join(failed)} (outputs in "
                                               f"{logs})" if failed else "all ok"), flush=True)
  if not failed and not args.logs:
    shutil.rmtree(logs, ignore_errors=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
