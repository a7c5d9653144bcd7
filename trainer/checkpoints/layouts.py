"""The checkpoint layouts detection tells apart, named by the family specs that load them (``FamilySpec.layout``)."""
from __future__ import annotations

from trainer.families import flux_spec, sd3_spec, stable_diffusion

SD1 = stable_diffusion.SD1.layout  # CLIP-L text encoder, SD 1.x UNet
SD2 = stable_diffusion.SD2.layout  # OpenCLIP-H text encoder, linear projections in the UNet
SDXL = stable_diffusion.SDXL.layout  # two text encoders (CLIP-L, OpenCLIP-bigG), SGM UNet with label embedding
FLUX1 = flux_spec.FLUX1.layout  # BFL transformer (double_blocks/single_blocks), CLIP-L + T5-XXL, 16-channel AE
SD3 = sd3_spec.SD3.layout  # SAI MMDiT (joint_blocks), CLIP-L + CLIP-G + T5-XXL (in the file or separate), 16-channel VAE
