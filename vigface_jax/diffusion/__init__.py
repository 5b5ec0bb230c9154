"""Diffusion library for VIGFace stage 2 (pixel DiT, v-prediction by default).

`schedules` builds the noise schedules (diffusers-compatible betas), `parameterization` converts
between ε, v and x0 predictions, `losses` holds the denoising / identity losses and condition
dropout, and `samplers` runs DDIM / DDPM (each one jitted `lax.scan`) with classifier-free
guidance.
"""
