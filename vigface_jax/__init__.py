"""vigface_jax: VIGFace (virtual identity generation for privacy-free FR) in JAX/Flax.

`add_cpu_xla_flags()` adds `CPU_XLA_FLAGS` to `XLA_FLAGS`: an XLA:CPU option that made the
training steps faster on CPU with results equal to float32 rounding, and the sampler and the
audit search slower (`BENCHMARKS.md` "XLA:CPU flags (A/B)"; GPU and TPU backends ignore it).
`python -m vigface_jax.main` calls it for the training tasks (`TRAINING_TASKS`) only, before
any backend starts (XLA reads `XLA_FLAGS` once, when the first backend starts). A flag the
user's `XLA_FLAGS` already names is left as the user set it, and `VIGFACE_CPU_XLA_FLAGS=0`
adds none.
"""

import os as _os

__version__ = "0.1.0"

# YNNPACK fusions for dots only: convolutions (their weight gradients among them) and the
# fused reductions go back to XLA:CPU's own kernels. On the 2-core CPU (benchmarks/
# xla_flags.py, medians of 3 passes) the demo FR step ran 1.30x and the unrolled demo DiT step
# 1.16x faster; the DDIM sampler and the audit search (whose products are fused with a
# reduction) ran slower, so only the trainers use it.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
TRAINING_TASKS = ("fr", "dit")
ENV_SWITCH = "VIGFACE_CPU_XLA_FLAGS"


def with_cpu_xla_flags(xla_flags: str, enabled: str | None = None) -> str:
  """`xla_flags` plus each of `CPU_XLA_FLAGS` it does not name (none when `enabled` is one of
  0 / false / no / off)."""
  if (enabled or "1").strip().lower() in ("0", "false", "no", "off"):
    return xla_flags
  named = {f.split("=", 1)[0] for f in xla_flags.split()}
  extra = [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in named]
  return " ".join([xla_flags.strip(), *extra]).strip()


def add_cpu_xla_flags() -> str:
  """Adds `CPU_XLA_FLAGS` to this process's `XLA_FLAGS` (see the module docstring); returns
  the result. Effective only before the first JAX backend starts."""
  flags = with_cpu_xla_flags(_os.environ.get("XLA_FLAGS", ""), _os.environ.get(ENV_SWITCH))
  if flags:
    _os.environ["XLA_FLAGS"] = flags
  return flags
