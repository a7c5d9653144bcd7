"""SDXL LoRA names: diffusers' UNet seen through the original SGM/LDM module names.

sd-scripts trains SDXL on its own SGM-layout UNet (``input_blocks``,
``middle_block``, ``output_blocks``), so SDXL LoRA keys carry those names, e.g.
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``. We train the
diffusers UNet instead; :func:`sgm_unet_view` builds a naming-only module tree
that holds the diffusers UNet's own layers at their SGM paths, so
``find_target_layers`` names them as sd-scripts does. The view is never run.

Block numbering (L = resnets per down block; diffusers' up blocks have L + 1):

* ``down_blocks.i.resnets.j`` / ``attentions.j`` -> ``input_blocks.{1 + (L+1)i + j}.0`` / ``.1``;
  ``down_blocks.i.downsamplers.0`` -> ``input_blocks.{(L+1)(i+1)}.0`` (conv named ``op``);
* ``mid_block``: resnets and attentions interleaved -> ``middle_block.0``, ``.1``, ``.2``;
* ``up_blocks.i.resnets.j`` / ``attentions.j`` -> ``output_blocks.{(L+1)i + j}.0`` / ``.1``;
  ``up_blocks.i.upsamplers.0`` -> ``output_blocks.{(L+1)i + L}.{2 if attentions else 1}`` (``conv``).

Inside a resnet: conv1 -> ``in_layers.2``, time_emb_proj -> ``emb_layers.1``,
conv2 -> ``out_layers.3``, conv_shortcut -> ``skip_connection``. Transformer
blocks already share their child names with the SGM UNet.
"""
from __future__ import annotations

from torch import nn

# The view nodes carry the class names of sd-scripts' sdxl_original_unet blocks, so LoRA and LyCORIS
# presets find the same targets in the view as in sd-scripts' model.
SGM_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

# diffusers resnet child -> its SGM path inside the block
RESNET_CHILDREN = {
    "norm1": "in_layers.0",  # norms: LyCORIS's train_norm
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


class _Node(nn.Module):
    """A container that only gives names to modules owned elsewhere."""

    def attach(self, path: str, module: nn.Module) -> None:
        head, _, rest = path.partition(".")
        if not rest:
            self.add_module(head, module)
            return
        child = getattr(self, head, None)
        if child is None:
            child = _Node()
            self.add_module(head, child)
        child.attach(rest, module)

    def forward(self, *args, **kwargs):  # pragma: no cover - a naming view only
        raise RuntimeError("the SGM naming view is not a runnable model")


class ResnetBlock2D(_Node):
    """A diffusers ResnetBlock2D's layers under the SGM ResBlock names."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name, sgm_path in RESNET_CHILDREN.items():
            layer = getattr(resnet, name, None)
            if layer is not None:
                self.attach(sgm_path, layer)


class Downsample2D(_Node):
    def __init__(self, downsample: nn.Module) -> None:
        super().__init__()
        self.attach("op", downsample.conv)


class Upsample2D(_Node):
    def __init__(self, upsample: nn.Module) -> None:
        super().__init__()
        self.attach("conv", upsample.conv)


def sgm_block_paths(unet: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(SGM path, kind, diffusers module) for every resnet, attention and resampler of ``unet``.

    kind is "resnet", "attention", "downsample" or "upsample".
    """
    paths: list[tuple[str, str, nn.Module]] = []
    index = 1  # input_blocks.0 is conv_in
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or []
        for j, resnet in enumerate(block.resnets):
            paths.append((f"input_blocks.{index}.0", "resnet", resnet))
            if attentions:
                paths.append((f"input_blocks.{index}.1", "attention", attentions[j]))
            index += 1
        for down in block.downsamplers or []:
            paths.append((f"input_blocks.{index}.0", "downsample", down))
            index += 1
    mid = unet.mid_block
    mid_attentions = list(getattr(mid, "attentions", None) or [])
    for k, resnet in enumerate(mid.resnets if mid is not None else []):  # resnet, attention, resnet, ...
        paths.append((f"middle_block.{2 * k}", "resnet", resnet))
        if k < len(mid_attentions):
            paths.append((f"middle_block.{2 * k + 1}", "attention", mid_attentions[k]))
    index = 0
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or []
        last = len(block.resnets) - 1
        for j, resnet in enumerate(block.resnets):
            paths.append((f"output_blocks.{index}.0", "resnet", resnet))
            if attentions:
                paths.append((f"output_blocks.{index}.1", "attention", attentions[j]))
            if j == last:
                for up in block.upsamplers or []:
                    paths.append((f"output_blocks.{index}.{2 if attentions else 1}", "upsample", up))
            index += 1
    return paths


# kind -> how the view holds the diffusers module (attention blocks keep their own children)
_VIEW_NODE = {
    "resnet": ResnetBlock2D,
    "downsample": Downsample2D,
    "upsample": Upsample2D,
    "attention": lambda module: module,
}


def sgm_unet_view(unet: nn.Module) -> nn.Module:
    """A module tree whose ``named_modules()`` paths are the SGM names of ``unet``'s layers."""
    root = _Node()
    for path, kind, module in sgm_block_paths(unet):
        root.attach(path, _VIEW_NODE[kind](module))
    return root
