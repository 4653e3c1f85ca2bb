"""Diffusion personalization (DreamBooth-style) with ALBAT-selected backbone data.

denoiser (DiT eps-model, class + identifier tokens) -> ddpm (schedule, losses, DDIM) ->
classifier (evaluation CNN) -> personalize (the experiment: `validate`, `run`).
"""
