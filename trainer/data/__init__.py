"""Dataset side of the trainer: kohya-style folders, step plan, buckets, captions, images, caching.

Submodules are imported directly (``from trainer.data.plan import plan_steps``); this
package imports nothing eagerly so the GUI's plan never pulls in torch.
"""
