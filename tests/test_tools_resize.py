"""LoRA resize: lossless at full rank, best low-rank approximation with the effective scale kept, sd-scripts'
dynamic rank rules, error reports and metadata."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_tools_support import one_thread, random_lora  # noqa: F401  (fixture)
from trainer.saving import sshs_hashes
from trainer.tools import ToolError, read_lora, resize_lora, verify_lora
from trainer.tools.lowrank import choose_rank

SINGULAR = torch.tensor([4.0, 3.0, 2.0, 1.0])


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


def known_module(name, out_dim, in_shape, alpha=8.0):
    """A rank-4 module whose up @ down has singular values 4, 3, 2, 1 along known directions."""
    u = orthonormal(out_dim, 4, 1)
    in_dim = int(torch.tensor(in_shape).prod())
    v = orthonormal(in_dim, 4, 2)
    down, up = v.T.reshape(4, *in_shape), u * SINGULAR
    if len(in_shape) == 3:
        up = up[:, :, None, None]
    tensors = {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
               f"{name}.alpha": torch.tensor(alpha)}
    return tensors, u, v


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A linear and a 3x3-conv module with known singular directions, and metadata as sd-scripts writes it."""
    linear, u, v = known_module("lora_unet_x_to_q", 16, (12,))
    conv, cu, cv = known_module("lora_unet_x_conv1", 8, (6, 3, 3), alpha=4.0)
    path = tmp_path_factory.mktemp("resize") / "known.safetensors"
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "8.0", "ss_training_comment": "my comment",
                "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4.0"}), "sshs_model_hash": "stale"}
    save_file({**linear, **conv}, str(path), metadata)
    return path, {"lora_unet_x_to_q": (u, v, 2.0), "lora_unet_x_conv1": (cu, cv, 1.0)}


def test_resize_to_full_rank_is_lossless(tmp_path, tiny_sd1_dir):
    source = random_lora(tmp_path, tiny_sd1_dir, "full")
    result = resize_lora(source, tmp_path / "same.safetensors", 4, conv_rank=2)
    before, after = read_lora(source), read_lora(result.out_path)
    assert set(after.modules) == set(before.modules)
    for name, module in before.modules.items():
        new = after.modules[name]
        assert (new.rank, new.alpha) == (module.rank, module.alpha)
        torch.testing.assert_close(new.delta(), module.delta(), rtol=1e-4, atol=1e-6)
    assert result.overall_error < 1e-5 and all(m.fro_retained > 0.99999 for m in result.modules)


def test_resize_keeps_the_top_singular_directions_and_the_effective_scale(tmp_path, known):
    path, truth = known
    result = resize_lora(path, tmp_path / "r2.safetensors", 2, conv_rank=3)
    resized = read_lora(result.out_path)
    for name, (u, v, scale) in truth.items():
        module, kept = resized.modules[name], 2 if name.endswith("to_q") else 3
        assert module.rank == kept and module.alpha == pytest.approx(scale * kept)  # old_alpha/old_rank × new_rank
        best = (u[:, :kept] * SINGULAR[:kept]) @ v[:, :kept].T * scale
        torch.testing.assert_close(module.delta().reshape(best.shape[0], -1), best, rtol=1e-4, atol=1e-5)
        info = next(m for m in result.modules if m.name == name)
        dropped = SINGULAR[kept:].pow(2).sum().sqrt() / SINGULAR.pow(2).sum().sqrt()
        assert info.relative_error == pytest.approx(float(dropped), rel=1e-4)
        assert info.fro_retained == pytest.approx(float((1 - dropped**2).sqrt()), rel=1e-4)
        old_delta = read_lora(path).modules[name].delta()
        measured = (module.delta() - old_delta).norm() / old_delta.norm()
        assert float(measured) == pytest.approx(info.relative_error, rel=1e-3)
    # overall error weighs each module by its ‖ΔW‖: both have ‖S‖ = √30, scales 2 and 1
    lost = (2**2 * (2**2 + 1) + 1**2 * 1) / (2**2 * 30 + 1**2 * 30)
    assert result.overall_error == pytest.approx(lost**0.5, rel=1e-4)


def test_low_rank_resize_equals_the_best_approximation_of_a_real_module(tmp_path, tiny_sd1_dir):
    """Eckart–Young: the QR-based factorisation gives the same error as an SVD of the full ΔW."""
    source = random_lora(tmp_path, tiny_sd1_dir, "to_rank_2")
    result = resize_lora(source, tmp_path / "r2.safetensors", 2, conv_rank=1)
    before, after = read_lora(source), read_lora(result.out_path)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in"):
        full = before.modules[name].delta()
        matrix = full.reshape(full.shape[0], -1)
        s = torch.linalg.svdvals(matrix)
        kept = after.modules[name].rank
        best_error = s[kept:].pow(2).sum().sqrt()
        assert float((after.modules[name].delta() - full).norm()) == pytest.approx(float(best_error), rel=1e-3)
    assert verify_lora(result.out_path, tiny_sd1_dir).ok


@pytest.mark.parametrize("method, param, expected", [
    ("sv_ratio", 2.5, 3),  # keep S > 4 / 2.5
    ("sv_ratio", 100.0, 4),
    ("sv_cumulative", 0.7, 2),  # cumulative sums 0.4, 0.7, 0.9, 1.0
    ("sv_cumulative", 0.71, 3),
    ("sv_fro", 0.9, 2),  # cumulative squares 16/30, 25/30 >= 0.81
    ("sv_fro", 0.95, 3),
])
def test_dynamic_rank_rules_follow_sd_scripts(method, param, expected):
    assert choose_rank(SINGULAR, 4, method, param) == expected
    assert choose_rank(SINGULAR, 2, method, param) == min(expected, 2)  # the rank is a hard limit


def test_zero_module_becomes_rank_one():
    assert choose_rank(torch.zeros(4), 4) == 1


def test_metadata_is_updated_and_hashes_recomputed(tmp_path, known):
    path, _ = known
    result = resize_lora(path, tmp_path / "r2.safetensors", 2, save_precision="fp16")
    with safe_open(result.out_path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2; my comment"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    dynamic = resize_lora(path, tmp_path / "dyn.safetensors", 4, dynamic_method="sv_fro", dynamic_param=0.9)
    assert dynamic.metadata["ss_network_dim"] == dynamic.metadata["ss_network_alpha"] == "Dynamic"
    assert dynamic.metadata["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 4; ")
    assert [m.new_rank for m in dynamic.modules] == [2, 2]
    assert "sv_fro 0.9 (max rank 4)" in dynamic.format() and "4 -> 2" in dynamic.format()


def test_resize_refuses_bad_arguments_and_existing_outputs(tmp_path, known):
    path, _ = known
    with pytest.raises(ToolError, match="at least 1"):
        resize_lora(path, tmp_path / "x.safetensors", 0)
    with pytest.raises(ToolError, match="needs a positive"):
        resize_lora(path, tmp_path / "x.safetensors", 4, dynamic_method="sv_ratio")
    with pytest.raises(ToolError, match="between 0 and 1"):
        resize_lora(path, tmp_path / "x.safetensors", 4, dynamic_method="sv_fro", dynamic_param=2)
    with pytest.raises(ToolError, match="input files"):
        resize_lora(path, path, 2, overwrite=True)
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    with pytest.raises(ToolError, match="already exists"):
        resize_lora(path, tmp_path / "taken.safetensors", 2)
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"
    with pytest.raises(ToolError, match="must end in"):
        resize_lora(path, tmp_path / "x.txt", 2)
