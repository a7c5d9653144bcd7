"""The checkpoint layouts detection tells apart, by name. A family's ``FamilySpec.layout`` names the one it loads."""
from __future__ import annotations

SD1 = "sd1"  # CLIP-L text encoder, SD 1.x UNet
SD2 = "sd2"  # OpenCLIP-H text encoder, linear projections in the UNet
SDXL = "sdxl"  # two text encoders (CLIP-L, OpenCLIP-bigG), SGM UNet with label embedding
LAYOUTS = (SD1, SD2, SDXL)
