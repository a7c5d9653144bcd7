"""Reading users' Stable Diffusion checkpoints offline (diffusers folders and single files)."""
