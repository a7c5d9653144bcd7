"""Lean implementations of the Stable Diffusion models (UNet, VAE, CLIP text encoders, CLIP tokenizer).

Plain PyTorch modules with the module paths, state-dict keys and numerics of the
diffusers/transformers classes of the same names, so the usual weights load as
they are, LoRA names match sd-scripts', and training imports neither library.
Nothing here imports diffusers, transformers, peft or accelerate.
"""
