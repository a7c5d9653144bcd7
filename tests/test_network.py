"""LoRA network: sd-scripts key set, shapes, math, dropout, weights files."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.network import CLIP_CLASSES, UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LoRANetwork, LoraTarget, NetworkSpec, Role
from trainer.network.network import NetworkConfigError
from trainer.network.weights import ranks_and_alphas

ATTN_CHILDREN = [
    f"transformer_blocks_{{b}}_{attn}_{proj}"
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out_0")
] + ["transformer_blocks_{b}_ff_net_0_proj", "transformer_blocks_{b}_ff_net_2"]
TE_CHILDREN = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def expected_unet_names(config, with_conv: bool) -> set[str]:
    """sd-scripts' UNet module list for SD1/SD2, derived from the UNet config alone.

    Transformer2DModel: proj_in, proj_out and per transformer block attn1/attn2
    q/k/v/out and ff; with conv: every ResnetBlock2D (conv1, conv2, time_emb_proj,
    conv_shortcut where channels change) and every down/upsampler conv.
    """
    names: set[str] = set()
    chans = list(config.block_out_channels)
    lpb = config.layers_per_block
    depth = config.transformer_layers_per_block
    depth = [depth] * len(chans) if isinstance(depth, int) else list(depth)

    def attention(path: str, n_blocks: int) -> None:
        names.update({f"{path}_proj_in", f"{path}_proj_out"})
        for b in range(n_blocks):
            names.update(f"{path}_" + c.format(b=b) for c in ATTN_CHILDREN)

    def resnet(path: str, shortcut: bool) -> None:
        if with_conv:
            names.update(f"{path}_{c}" for c in ("conv1", "conv2", "time_emb_proj"))
            if shortcut:
                names.add(f"{path}_conv_shortcut")

    prev = chans[0]
    for i, kind in enumerate(config.down_block_types):
        for j in range(lpb):
            resnet(f"lora_unet_down_blocks_{i}_resnets_{j}", shortcut=(prev if j == 0 else chans[i]) != chans[i])
            if kind.startswith("CrossAttn"):
                attention(f"lora_unet_down_blocks_{i}_attentions_{j}", depth[i])
        if i < len(chans) - 1 and with_conv:
            names.add(f"lora_unet_down_blocks_{i}_downsamplers_0_conv")
        prev = chans[i]
    attention("lora_unet_mid_block_attentions_0", depth[-1])
    for j in range(2):
        resnet(f"lora_unet_mid_block_resnets_{j}", shortcut=False)
    for i, kind in enumerate(config.up_block_types):
        rev = len(chans) - 1 - i
        for j in range(lpb + 1):
            resnet(f"lora_unet_up_blocks_{i}_resnets_{j}", shortcut=True)  # skip concat changes channels
            if kind.startswith("CrossAttn"):
                attention(f"lora_unet_up_blocks_{i}_attentions_{j}", depth[rev])
        if i < len(chans) - 1 and with_conv:
            names.add(f"lora_unet_up_blocks_{i}_upsamplers_0_conv")
    return names


def expected_te_names(num_layers: int) -> set[str]:
    return {f"lora_te_text_model_encoder_layers_{n}_{c}" for n in range(num_layers) for c in TE_CHILDREN}


def module_names(state_dict: dict) -> set[str]:
    return {key.split(".")[0] for key in state_dict}


def targets(pipe) -> list[LoraTarget]:
    return [
        LoraTarget("lora_te", pipe.text_encoder, CLIP_CLASSES, Role.TEXT_ENCODER, path_prefix="text_model."),
        LoraTarget("lora_unet", pipe.unet, UNET_ATTENTION_CLASSES, Role.UNET, UNET_CONV_CLASSES),
    ]


class Block(torch.nn.Module):
    """A stand-in target class for unit tests of the wrapping."""


def block_root(**layers) -> torch.nn.Module:
    root = torch.nn.Module()
    root.block = Block()
    for name, layer in layers.items():
        setattr(root.block, name, layer)
    return root


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True)


@pytest.fixture(scope="module")
def sd2_pipe(tiny_sd2_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True)


@pytest.mark.parametrize("with_conv", [False, True])
def test_sd1_key_set_equals_sd_scripts(sd1_pipe, with_conv):
    net = LoRANetwork.build(targets(sd1_pipe), NetworkSpec(rank=4, alpha=1, conv_rank=2 if with_conv else 0))
    sd = net.lora_state_dict()
    layers = sd1_pipe.text_encoder.config.num_hidden_layers
    assert module_names(sd) == expected_unet_names(sd1_pipe.unet.config, with_conv) | expected_te_names(layers)
    # exactly three tensors per module, alpha a 0-d tensor
    for name in module_names(sd):
        assert {k for k in sd if k.startswith(name + ".")} == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        assert sd[f"{name}.alpha"].dim() == 0


def test_shapes_follow_layer_kind(sd1_pipe, sd2_pipe):
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=3, conv_alpha=1)
    sd1 = LoRANetwork.build(targets(sd1_pipe), spec).lora_state_dict()
    # SD1 proj_in is a 1x1 conv: 4-D weights with network_dim
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (32, 4, 1, 1)
    # 3x3 convs get conv_dim, their kernel on lora_down and a 1x1 lora_up
    assert sd1["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 32, 3, 3)
    assert sd1["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 3, 1, 1)
    assert sd1["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    # Linear children of ResnetBlock2D get network_dim
    assert sd1["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert sd1["lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_down.weight"].shape[0] == 4
    # SD2 (diffusers folder) has linear projections: 2-D weights
    sd2 = LoRANetwork.build(targets(sd2_pipe), spec).lora_state_dict()
    assert sd2["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 2
    layers = sd2_pipe.text_encoder.config.num_hidden_layers
    assert module_names(sd2) == expected_unet_names(sd2_pipe.unet.config, True) | expected_te_names(layers)


def test_update_is_zero_at_init_and_matches_delta_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    conv = torch.nn.Conv2d(4, 3, 3, stride=2, padding=1)
    root = block_root(linear=linear, conv=conv)
    target = LoraTarget("lora_x", root, (), Role.UNET, ("Block",))
    x_lin, x_conv = torch.randn(2, 6), torch.randn(2, 4, 8, 8)
    base_lin, base_conv = linear(x_lin), conv(x_conv)
    net = LoRANetwork.build([target], NetworkSpec(rank=2, alpha=1, conv_rank=2, conv_alpha=4))
    net.apply_to()
    assert torch.equal(linear(x_lin), base_lin)  # up is zero-initialised
    for module in net.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight)
    lin_mod = net.get_submodule("lora_x_block_linear")
    conv_mod = net.get_submodule("lora_x_block_conv")
    assert lin_mod.scale == 0.5 and conv_mod.scale == 2.0
    torch.testing.assert_close(linear(x_lin) - base_lin, x_lin @ lin_mod.delta_weight().T)
    expected = torch.nn.functional.conv2d(x_conv, conv_mod.delta_weight(), stride=2, padding=1)
    torch.testing.assert_close(conv(x_conv) - base_conv, expected, rtol=1e-4, atol=1e-5)
    net.restore()
    assert torch.equal(linear(x_lin), base_lin)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    root = block_root(linear=torch.nn.Linear(8, 8))
    target = LoraTarget("lora_x", root, ("Block",), Role.UNET)
    x = torch.randn(4, 8)
    base = root.block.linear(x)
    net = LoRANetwork.build([target], NetworkSpec(rank=4, module_dropout=1.0, rank_dropout=0.5))
    net.apply_to()
    torch.nn.init.normal_(net.lora_modules()[0].lora_up.weight)
    net.train()
    assert torch.equal(root.block.linear(x), base)  # module dropout 1.0 skips the LoRA
    net.eval()
    assert not torch.equal(root.block.linear(x), base)
    module = net.lora_modules()[0]
    module.module_dropout = 0.0
    net.train()
    torch.manual_seed(1)
    a = root.block.linear(x)
    torch.manual_seed(2)
    b = root.block.linear(x)
    assert not torch.equal(a, b)  # rank dropout masks differ by draw


def test_network_weights_roundtrip_and_dim_from_weights(sd1_pipe):
    spec = NetworkSpec(rank=4, alpha=2)
    net = LoRANetwork.build(targets(sd1_pipe), spec)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    saved = net.lora_state_dict()
    fresh = LoRANetwork.build(targets(sd1_pipe), spec)
    missing, unexpected = fresh.load_lora_state_dict(saved)
    assert not missing and not unexpected
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(NetworkConfigError) as err:
        LoRANetwork.build(targets(sd1_pipe), NetworkSpec(rank=8, alpha=2)).load_lora_state_dict(saved)
    assert err.value.field == "network_weights"
    ranks, alphas = ranks_and_alphas(saved)
    from_file = LoRANetwork.build(targets(sd1_pipe), NetworkSpec(rank=16, module_ranks=ranks, module_alphas=alphas))
    assert set(from_file.state_dict()) == set(saved)
    assert all(m.rank == 4 and m.scale == 0.5 for m in from_file.lora_modules())


def test_param_groups_by_role(sd1_pipe):
    net = LoRANetwork.build(targets(sd1_pipe), NetworkSpec(rank=2))
    groups = net.param_groups({Role.UNET: 1e-4, Role.TEXT_ENCODER: 5e-5})
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("textencoder", 5e-5)]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert [g["name"] for g in net.param_groups({Role.UNET: 1e-4, Role.TEXT_ENCODER: 0})] == ["unet"]


def test_scale_weight_norms_caps_delta_norm():
    root = block_root(linear=torch.nn.Linear(16, 16))
    net = LoRANetwork.build([LoraTarget("lora_x", root, ("Block",), Role.UNET)], NetworkSpec(rank=4, alpha=4))
    module = net.lora_modules()[0]
    torch.nn.init.constant_(module.lora_up.weight, 1.0)
    torch.nn.init.constant_(module.lora_down.weight, 1.0)
    assert module.delta_weight().norm().item() > 1.0
    scaled, mean_norm, max_norm = net.apply_max_norm(1.0)
    assert scaled == 1
    assert module.delta_weight().norm().item() == pytest.approx(1.0, rel=1e-4)
    assert max_norm == pytest.approx(1.0, rel=1e-4)


def test_rank_dropout_masks_per_sample_when_tokens_come_as_rows():
    """The lean models pass tokens as rows (batch * tokens, features); rank dropout still draws one mask per
    sample, as sd-scripts does on (batch, tokens, features): same draw, same output."""
    root = block_root(linear=torch.nn.Linear(8, 8))
    net = LoRANetwork.build([LoraTarget("lora_x", root, ("Block",), Role.UNET)], NetworkSpec(rank=4, rank_dropout=0.5))
    net.apply_to()
    torch.nn.init.normal_(net.lora_modules()[0].lora_up.weight)
    net.train()
    x = torch.randn(2, 5, 8)  # 2 samples of 5 tokens
    net.set_batch_size(2)
    torch.manual_seed(3)
    as_tokens = root.block.linear(x)
    torch.manual_seed(3)
    as_rows = root.block.linear(x.reshape(10, 8))
    torch.testing.assert_close(as_rows, as_tokens.reshape(10, 8))
    net.set_batch_size(10)  # told every row is a sample: masks differ between a sample's tokens
    torch.manual_seed(3)
    assert not torch.allclose(root.block.linear(x.reshape(10, 8)), as_rows)


def test_rows_fast_path_adds_the_scaled_update():
    root = block_root(linear=torch.nn.Linear(8, 6))
    net = LoRANetwork.build([LoraTarget("lora_x", root, ("Block",), Role.UNET)], NetworkSpec(rank=4, alpha=1))
    net.apply_to()
    module = net.lora_modules()[0]
    torch.nn.init.normal_(module.lora_up.weight)
    module.multiplier = 0.7
    x = torch.randn(10, 8)
    expected = torch.nn.functional.linear(x, root.block.linear.weight, root.block.linear.bias) + (
        x @ module.lora_down.weight.T @ module.lora_up.weight.T) * (0.7 * 1 / 4)
    torch.testing.assert_close(root.block.linear(x), expected)
    torch.testing.assert_close(root.block.linear(x.reshape(2, 5, 8)), expected.reshape(2, 5, 6))


def test_init_and_dropouts_draw_from_the_given_generators_not_the_global_rng():
    """A run's network: its initial weights and every dropout (network, rank, module) come from its own
    generators, so draws on another thread cannot change them, and the global RNG is left as it was."""
    def run(scramble: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        root = block_root(linear=torch.nn.Linear(8, 8))  # the same base layer each time
        torch.manual_seed(scramble)
        before = torch.get_rng_state()
        spec = NetworkSpec(rank=4, dropout=0.3, rank_dropout=0.3, module_dropout=0.3)
        net = LoRANetwork.build([LoraTarget("lora_x", root, ("Block",), Role.UNET)], spec,
                                torch.Generator().manual_seed(5))
        net.set_dropout_generator(torch.Generator().manual_seed(6))
        net.apply_to()
        torch.nn.init.constant_(net.lora_modules()[0].lora_up.weight, 0.5)
        net.train()
        outputs = []
        for _ in range(8):
            net.next_dropout_draws()
            outputs.append(root.block.linear(torch.ones(2, 8)))
            # gradient checkpointing runs the block again in backward: the same batch, the same masks
            assert torch.equal(root.block.linear(torch.ones(2, 8)), outputs[-1])
        assert torch.equal(torch.get_rng_state(), before)
        return net.lora_modules()[0].lora_down.weight.detach().clone(), torch.stack(outputs)

    down_a, out_a = run(scramble=1)
    down_b, out_b = run(scramble=2)
    assert torch.equal(down_a, down_b) and torch.equal(out_a, out_b)
    assert len({tuple(o.flatten().tolist()) for o in out_a}) > 1  # the dropouts do draw
