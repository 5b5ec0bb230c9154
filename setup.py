"""Packaging for vigface_jax: runtime pins come from requirements.txt."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


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
        "test": ["pytest==9.0.3", "torch==2.13.0", "scikit-image==0.26.0",
                 "diffusers==0.35.1"],
    },
    license="Apache-2.0",
)
