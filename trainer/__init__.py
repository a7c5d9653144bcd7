"""Nekoya's in-process LoRA trainer. Never imports gradio.

Kept light on purpose: importing ``trainer`` does not import torch, so the CLI's
``config``/``check`` commands and the GUI start fast. The training entry point is
``trainer.loop.train(settings, sink, control)``.
"""
