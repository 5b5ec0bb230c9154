r"""Where a training step's time goes: a `jax.profiler` trace beside `torch.profiler`.

    python -m benchmarks.profile_step --variant=small --input_size=48 --embed_dim=128 \
        --batch=64 --num_classes=1600            # the demo net (benchmarks.run's fr_demo)
    python -m benchmarks.profile_step --variant=r50 --batch=8 --num_classes=2000   # fr_r50
    python -m benchmarks.profile_step --bench=dit --batch=32   # benchmarks.run's dit_step

`--bench=fr` (default) profiles the two steps `benchmarks/fr_step.py` times, `--bench=dit`
the two `benchmarks/dit_step.py` times (`--scan` the trainer's scanned blocks); each takes
that script's flags and setup (the trainer's own jitted step and the PyTorch reference from
identical weights), and each side is profiled over `--trace_steps` steps after warm-up:

* JAX: `jax.profiler` with a Perfetto trace; every XLA op the CPU runtime executed is matched
  by name to the compiled step's HLO and put in one of a few kinds: **conv / matmul** (XLA:CPU's
  `ynn_fusion`s, convolutions, dots), **layout copies** (`transpose`/`copy` fusions: XLA:CPU
  lays a weight gradient's activations out batch-minor before the convolution that computes
  it), **elementwise + reductions** (the other fusions: BatchNorm, PReLU, LayerNorm, GELU,
  softmax, the loss, the optimizer), and the rest. Each is split into forward, backward
  (ops whose metadata says `transpose(`: JAX's reverse pass), update (other ops with JAX
  metadata: the optimizer, norms, the finite guard) and unlabelled (ops XLA made without
  any: mostly the weight gradients' convolutions and their layout copies). The same steps
  are also timed without the profiler; what their time exceeds the op events' sum by is a
  row of its own: XLA:CPU's own convolutions run asynchronously on its thread pool and their
  events cover the launch only, so with `--xla_cpu_experimental_ynn_fusion_type=dot` (the
  trainers' CPU flag, which takes convolutions out of YNNPACK) that row is mostly
  convolution time.
* PyTorch: `torch.profiler` (CPU), self time per aten op, in the same kinds.

Both are printed with each kind's milliseconds per step and its share, and written as one
section of `--output` (BENCHMARKS.md by default; `--output=` only prints). Profiling adds
overhead to both sides; the step times of record are that script's.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

_REPO = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import cpu_threads  # pins --threads CPUs; before jax
from absl import app
from absl import flags
import jax
import torch

from benchmarks import data_pipeline as dp
import vigface_jax


def _early_bench() -> str:
  """`--bench` read before absl parses flags: it decides which script's flags to define."""
  for arg in sys.argv[1:]:
    if arg.startswith("--bench="):
      return arg.split("=", 1)[1]
  return "fr"


BENCH = _early_bench()
if BENCH == "dit":
  from benchmarks import dit_step  # its flags and setup
else:
  from benchmarks import fr_step  # its flags and setup
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_enum("bench", "fr", ["fr", "dit"], "The step: fr (benchmarks/fr_step.py's) or "
                  "dit (benchmarks/dit_step.py's). Must be given as --bench=NAME.")
_SCAN = flags.DEFINE_bool("scan", False, "--bench=dit: profile the scanned blocks' step.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 3, "Steps profiled per framework.")
_TOP = flags.DEFINE_integer("top", 12, "Single ops listed per framework.")
_HEADING = flags.DEFINE_string("heading", "", "Appended to the section heading (', NOTE'), so "
                               "a profile of another size keeps a section of its own.")

SECTIONS = {"fr": "## Where the stage-1 step's time goes (profiles)",
            "dit": "## Where the DiT step's time goes (profiles)"}


def heading() -> str:
  """This run's section heading: the bench's, with `--heading` appended."""
  return SECTIONS[BENCH] + (f", {_HEADING.value}" if _HEADING.value else "")
KINDS = ("conv / matmul", "layout copies", "elementwise + reductions", "other")
PHASES = ("forward", "backward", "update", "unlabelled")
_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(")
_OP_NAME = re.compile(r'metadata=\{op_name="([^"]*)"')


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name → (opcode, JAX op_name) of every instruction of a compiled module (names
  are unique in a module). A fusion without metadata of its own takes the op_name of the first
  instruction inside the computation it calls that has one."""
  ops, calls, first_meta, computation = {}, {}, {}, ""
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c and line.rstrip().endswith("{"):
      computation = c.group(1)
      continue
    m = _OP.match(line)
    if not m:
      continue
    meta = _OP_NAME.search(line)
    op_name = meta.group(1) if meta else ""
    if op_name:
      first_meta.setdefault(computation, op_name)
    called = _CALLS.search(line)
    if called:
      calls[m.group(1)] = called.group(1)
    ops[m.group(1)] = (m.group(2), op_name)
  return {name: (opcode, op_name or first_meta.get(calls.get(name, ""), ""))
          for name, (opcode, op_name) in ops.items()}


def kind_of(name: str, opcode: str) -> str:
  """The kind of one executed XLA op (`KINDS`), from its HLO name and opcode."""
  base = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
  if base.startswith(("ynn_fusion", "convolution", "conv_general_dilated", "dot")) or (
      opcode in ("convolution", "dot")):
    return KINDS[0]
  if base.startswith(("transpose", "copy")) or opcode in ("transpose", "copy"):
    return KINDS[1]
  if opcode == "fusion" or base.endswith("_fusion"):
    return KINDS[2]
  return KINDS[3]


def phase_of(op_name: str) -> str:
  """forward / backward / update / unlabelled of an op, from its JAX metadata (`transpose(` =
  the reverse pass; `jvp(` without it = the forward pass; other ops = the update, norms and
  guard; no metadata at all = an op XLA made, such as a layout copy)."""
  if not op_name:
    return "unlabelled"
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def jax_profile(trainer: Any, batch: Any, steps: int) -> dict[str, Any]:
  """Trace `steps` steps of the trainer's step; time per (kind, phase) and per op, ms/step."""
  compiled = trainer.step.lower(trainer.state, batch).compile()
  ops = hlo_ops(compiled.as_text())
  state = trainer.state
  for _ in range(2):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  plain = []  # the same steps without the profiler: what the op events should account for
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    plain.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / steps
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
    with gzip.open(files[-1]) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  trainer.state = state
  table: collections.Counter = collections.Counter()
  single: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("name") not in ops:
      continue
    opcode, op_name = ops[e["name"]]
    ms = e.get("dur", 0) / 1e3 / steps
    table[(kind_of(e["name"], opcode), phase_of(op_name))] += ms
    single[(e["name"], op_name)] += ms
  return {"wall_ms": wall * 1e3, "step_ms": sorted(plain)[len(plain) // 2] * 1e3,
          "table": table, "single": single.most_common(_TOP.value)}


_TORCH_KINDS = (
    ("conv / matmul", ("conv", "mkldnn", "addmm", "mm", "linear", "matmul", "bmm",
                       "scaled_dot_product", "flash_attention")),
    ("layout copies", ("copy_", "permute", "contiguous", "clone", "transpose", "im2col",
                       "col2im")),
    ("elementwise + reductions", ("batch_norm", "layer_norm", "prelu", "gelu", "silu",
                                  "softmax", "where", "cross_entropy", "nll", "norm", "mul",
                                  "add", "div", "sub", "cos", "sin", "exp", "acos", "clamp",
                                  "threshold", "sum", "mean", "sqrt", "pow", "lerp", "fill",
                                  "zero", "adam", "sgd", "foreach", "interpolate",
                                  "upsample")))


def torch_kind(name: str) -> str:
  op = name.split("::")[-1]
  for kind, keys in _TORCH_KINDS:
    if any(k in op for k in keys):
      return kind
  return "other"


def torch_profile(step: Any, steps: int) -> dict[str, Any]:
  """torch.profiler over `steps` calls of `step()`: self CPU ms/step per kind and per op."""
  for _ in range(2):
    step()
  from torch import profiler  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  wall = (time.perf_counter() - t0) / steps
  kinds: collections.Counter = collections.Counter()
  single = []
  for ev in prof.key_averages():
    ms = ev.self_cpu_time_total / 1e3 / steps
    kinds[torch_kind(ev.key)] += ms
    single.append((ms, ev.key, ev.count // steps))
  single.sort(reverse=True)
  return {"wall_ms": wall * 1e3, "kinds": kinds, "single": single[:_TOP.value]}


def fr_sides() -> tuple[Any, Any, Any, str]:
  """`benchmarks/fr_step.py`'s two steps: (trainer, device batch, torch step(), description)."""
  f = fr_step
  tstep, trainer, batch, timages, tlabels, _ = f.build()
  d, c, b = f._EMBED_DIM.value, f._NUM_CLASSES.value, f._BATCH.value  # pylint: disable=protected-access
  size = f._INPUT_SIZE.value  # pylint: disable=protected-access
  what = (f"IResNet-{f._VARIANT.value} at {size}x{size}, batch {b}, {c} centres x {d}, "  # pylint: disable=protected-access
          f"{f._DTYPE.value}")  # pylint: disable=protected-access
  return trainer, batch, lambda: tstep(timages, tlabels), what


def dit_sides() -> tuple[Any, Any, Any, str]:
  """`benchmarks/dit_step.py`'s two steps (the unrolled or, with --scan, scanned trainer)."""
  sides = dit_step.build()
  trainer = sides.trainers["scan" if _SCAN.value else "jax"]
  sides.trainers.clear()
  r = sides.out
  what = (f"DiT ({r['hidden']} wide, {r['depth']} blocks, {r['heads']} heads) with "
          f"{dit_step._PATCH.value}x{dit_step._PATCH.value} patches at "  # pylint: disable=protected-access
          f"{dit_step._IMAGE_SIZE.value}x{dit_step._IMAGE_SIZE.value} ({r['tokens']} tokens; "  # pylint: disable=protected-access
          f"faces of {dit_step.INPUT_SIZE}x{dit_step.INPUT_SIZE}), batch "
          f"{dit_step._BATCH.value}, identity loss through the frozen IResNet-"  # pylint: disable=protected-access
          f"{r['fr']['arch']}, {dit_step._DTYPE.value}, blocks "  # pylint: disable=protected-access
          f"{'scanned' if _SCAN.value else 'unrolled'}")
  return (trainer, trainer.put_batch(sides.batch), lambda: sides.tstep.step(sides.tbatch),
          what)


def run() -> dict[str, Any]:
  trainer, batch, torch_step, what = dit_sides() if BENCH == "dit" else fr_sides()
  steps = _TRACE_STEPS.value
  out = {"what": what, "jax": jax_profile(trainer, batch, steps),
         "torch": torch_profile(torch_step, steps)}
  out.update(cpu_threads.environment(torch.get_num_threads()))
  return out


def to_markdown(info: dict[str, Any], r: dict[str, Any]) -> str:
  j, t = r["jax"], r["torch"]
  events = sum(j["table"].values())
  uncovered = max(0.0, j["step_ms"] - events)
  jtotal = (events + uncovered) or 1.0
  ttotal = sum(t["kinds"].values()) or 1.0
  script = "dit_step" if BENCH == "dit" else "fr_step"
  lines = dp.section_header(heading(), "benchmarks.profile_step", info) + [
      f"{r['what']}; {r['torch_threads']} torch threads, process pinned to {r['affinity']} "
      "CPU(s); "
      f"{_TRACE_STEPS.value} profiled steps each after 2 warm-up steps. Wall time per step "
      f"under the profilers: JAX {j['wall_ms']:.0f} ms, PyTorch {t['wall_ms']:.0f} ms "
      f"(profiling slows both; `benchmarks/{script}.py` has the step times of record).",
      "",
      "JAX (the trainer's jitted step; XLA op time from `jax.profiler`, ms per step). The op "
      f"events sum to {events:.1f} ms per step against {j['step_ms']:.1f} ms for the same step "
      "timed without the profiler (median); the difference is the last row. XLA:CPU runs "
      "its own convolutions (those not in a `ynn_fusion`) asynchronously on its thread pool, "
      "and their events cover the launch only (a lone 3×3 convolution: a 0.1 ms event for a "
      "25 ms convolution), so most of that row is convolution time and the conv row is a "
      "lower bound:",
      "",
      "| kind | " + " | ".join(PHASES) + " | total | share |",
      "|---|" + "---:|" * (len(PHASES) + 2),
  ]
  for kind in KINDS:
    row = [j["table"].get((kind, p), 0.0) for p in PHASES]
    lines.append(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in row) +
                 f" | {sum(row):.1f} | {100 * sum(row) / jtotal:.0f}% |")
  lines.append("| not covered by op events (step time without the profiler − their sum) | " +
               " | ".join("–" for _ in PHASES) +
               f" | {uncovered:.1f} | {100 * uncovered / jtotal:.0f}% |")
  lines += ["", "Largest single JAX ops (ms per step, HLO name, JAX op):", ""]
  lines += [f"* {ms:.1f} `{name}` {op_name[-90:]}" for (name, op_name), ms in j["single"]]
  lines += ["", "PyTorch (the reference step; self CPU time from `torch.profiler`, ms per "
            "step):", "", "| kind | total | share |", "|---|---:|---:|"]
  for kind in KINDS:
    v = t["kinds"].get(kind, 0.0)
    lines.append(f"| {kind} | {v:.1f} | {100 * v / ttotal:.0f}% |")
  lines += ["", "Largest single PyTorch ops (self ms per step, calls per step):", ""]
  lines += [f"* {ms:.1f} `{key}` x{n}" for ms, key, n in t["single"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The trainers' XLA:CPU flags, as `python -m vigface_jax.main` adds them for training tasks
  # (before dp.machine() starts the backend; VIGFACE_CPU_XLA_FLAGS=0: none).
  vigface_jax.add_cpu_xla_flags()
  info = dp.machine()
  r = run()
  info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  section = to_markdown(info, r)
  print(section)
  if flags.FLAGS.output:
    dp.write_output(flags.FLAGS.output, section, heading())


if __name__ == "__main__":
  app.run(main)
