"""Packaging for vigface_jax: runtime pins come from requirements.txt."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def _jax_pin():
  """The `==` version of jax in requirements.txt: the accelerator extras install that one."""
  pins = [r.split("==", 1)[1] for r in _requirements() if r.startswith("jax==")]
  if len(pins) != 1:
    raise RuntimeError("requirements.txt must pin jax exactly once (jax==X.Y.Z)")
  return pins[0]


setuptools.setup(
    name="vigface_jax",
    version="0.1.0",
    description=(
        "VIGFace in JAX/Flax: virtual identity generation for privacy-free"
        " face recognition."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vigface_jax", "vigface_jax.*"]),
    install_requires=_requirements(),
    extras_require={
        # Test-only dependencies; never imported by library code.
        # facenet-pytorch (for its O-Net weights file) must be installed with --no-deps: its
        # own requirements would replace torch; README's install command does that.
        # jax[tpu] brings libtpu, for the ahead-of-time dry run for a named TPU slice
        # (tests/test_compile_only.py); with JAX_PLATFORMS=cpu it never starts a TPU backend.
        "test": ["pytest==9.0.3", "torch==2.13.0", "scikit-image==0.26.0",
                 "diffusers==0.35.1", "hypothesis==6.155.2", f"jax[tpu]=={_jax_pin()}"],
        # Accelerators, at the same jax version as the CPU install (README "Running on Cloud
        # TPU and GPU clusters"): TPU VMs (libtpu), NVIDIA GPUs with CUDA 13 or 12 (the CUDA
        # libraries come as pip wheels; a driver is all the machine needs).
        "tpu": [f"jax[tpu]=={_jax_pin()}"],
        "cuda": [f"jax[cuda13]=={_jax_pin()}"],
        "cuda12": [f"jax[cuda12]=={_jax_pin()}"],
    },
    license="Apache-2.0",
)
