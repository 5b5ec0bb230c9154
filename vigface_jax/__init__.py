"""vigface_jax: VIGFace (virtual identity generation for privacy-free FR) in JAX/Flax.

Importing the package adds `CPU_XLA_FLAGS` to `XLA_FLAGS` (XLA:CPU options that made our CPU
steps faster with results equal to float32 rounding, `BENCHMARKS.md` "XLA:CPU flags (A/B)";
GPU and TPU backends ignore them). A flag the user's `XLA_FLAGS` already names is left as the
user set it, and `VIGFACE_CPU_XLA_FLAGS=0` adds none. XLA reads `XLA_FLAGS` when the first
backend starts, so the flags apply when `vigface_jax` is imported before anything runs on a
JAX device (`python -m vigface_jax.main` always is).
"""

import os as _os

__version__ = "0.1.0"

# YNNPACK fusions for dots only: convolutions (the weight gradients among them) go back to
# XLA:CPU's own kernels, which on the 2-core CPU made the demo FR step 1.3x and the unrolled
# demo DiT step 1.16x faster (medians of 3 passes, benchmarks/xla_flags.py).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
ENV_SWITCH = "VIGFACE_CPU_XLA_FLAGS"


def with_cpu_xla_flags(xla_flags: str, enabled: str | None = None) -> str:
  """`xla_flags` plus each of `CPU_XLA_FLAGS` it does not name (none when `enabled` is one of
  0 / false / no / off)."""
  if (enabled or "1").strip().lower() in ("0", "false", "no", "off"):
    return xla_flags
  named = {f.split("=", 1)[0] for f in xla_flags.split()}
  extra = [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in named]
  return " ".join([xla_flags.strip(), *extra]).strip()


_os.environ["XLA_FLAGS"] = with_cpu_xla_flags(_os.environ.get("XLA_FLAGS", ""),
                                              _os.environ.get(ENV_SWITCH))
if not _os.environ["XLA_FLAGS"]:
  del _os.environ["XLA_FLAGS"]
