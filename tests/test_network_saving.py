"""LoRA files: atomic writes, sshs hashes, names, and loading into diffusers."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer import saving
from trainer.network import CLIP_CLASSES, UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES, LoRANetwork, LoraTarget, NetworkSpec, Role


def _tensors(n: int = 3, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"lora_unet_m{i}.lora_down.weight": torch.randn(size, size, generator=g) for i in range(n)}


def test_file_names_match_sd_scripts():
    assert saving.epoch_file_name("mylora", 3, ".safetensors") == "mylora-000003.safetensors"
    assert saving.step_file_name("mylora", 500, ".safetensors") == "mylora-step00000500.safetensors"
    assert saving.final_file_name("mylora", ".ckpt") == "mylora.ckpt"


def test_last_n_windows():
    assert saving.epoch_to_remove(5, every_n_epochs=1, keep_last_n=2) == 3
    assert saving.epoch_to_remove(2, every_n_epochs=1, keep_last_n=2) is None
    assert saving.epoch_to_remove(6, every_n_epochs=2, keep_last_n=2) == 2
    assert saving.epoch_to_remove(6, every_n_epochs=2, keep_last_n=0) is None
    # sd-scripts: step - last_n - 1, rounded down to a multiple of every_n
    assert saving.step_to_remove(300, every_n_steps=100, keep_last_n_steps=150) == 100
    assert saving.step_to_remove(200, every_n_steps=100, keep_last_n_steps=150) is None


def test_safetensors_metadata_and_hashes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save

    tensors = _tensors(n=40, size=128)  # > 1.1 MiB so the legacy hash window has data
    meta = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "x"}
    path = tmp_path / "x.safetensors"
    saving.save_lora_file(str(path), tensors, meta)
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
        assert set(f.keys()) == set(tensors)
    assert all(isinstance(v, str) for v in stored.values())
    assert stored["ss_network_dim"] == "4"
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    # the model hash is the sha256 of the file's tensor data region (A1111 "addnet" hash)
    assert stored["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert stored["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    from trainer import safety

    path = tmp_path / "keep.safetensors"
    saving.save_lora_file(str(path), _tensors(), {"ss_a": "1"})
    before = path.read_bytes()

    def disk_full(fd):  # the new file's data reaches the disk at fsync: that is where ENOSPC shows
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safety.os, "fsync", disk_full)
    with pytest.raises(saving.SaveError) as err:
        saving.save_lora_file(str(path), _tensors(n=5), {"ss_a": "2"})
    assert err.value.previous_intact and err.value.disk_full
    assert "No space left" in str(err.value) and "intact" in str(err.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]  # no temp file left behind


def test_saved_files_follow_the_umask_and_leave_no_library_temp(tmp_path):
    previous = os.umask(0o027)
    try:
        saving.save_lora_file(str(tmp_path / "a.safetensors"), _tensors(), {"ss_a": "1"})
        saving.save_lora_file(str(tmp_path / "a.ckpt"), _tensors(), {})
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.safetensors": 0o640, "a.ckpt": 0o640}


def test_kept_weights_save_to_a_folder_or_a_file(tmp_path):
    from safetensors import safe_open

    kept = saving.KeptWeights(_tensors(), {"ss_steps": "7"}, step=7, epoch=1, file_name="x-step00000007.safetensors")
    folder_path = kept.save_to(tmp_path)
    assert folder_path == str(tmp_path / "x-step00000007.safetensors") and kept.saved_path == folder_path
    file_path = kept.save_to(tmp_path / "elsewhere.safetensors")
    with safe_open(file_path, "pt") as f:
        assert f.metadata()["ss_steps"] == "7" and "sshs_model_hash" in f.metadata()
        torch.testing.assert_close(f.get_tensor("lora_unet_m0.lora_down.weight"), kept.tensors["lora_unet_m0.lora_down.weight"])


def test_ckpt_is_torch_saved_state_dict(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.ckpt"
    saving.save_lora_file(str(path), tensors, {"ss_a": "1"})
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_saved_lora_loads_in_diffusers_and_changes_output(tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    targets = [
        LoraTarget("lora_te", pipe.text_encoder, CLIP_CLASSES, Role.TEXT_ENCODER, path_prefix="text_model."),
        LoraTarget("lora_unet", pipe.unet, UNET_ATTENTION_CLASSES, Role.UNET, UNET_CONV_CLASSES),
    ]
    net = LoRANetwork.build(targets, NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=1))
    torch.manual_seed(0)
    for module in net.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight, std=0.5)
    path = tmp_path / "lora.safetensors"
    saving.save_lora_file(str(path), net.lora_state_dict(torch.float16), {"ss_network_dim": "4"})

    def render():
        return pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    conv1 = pipe.unet.down_blocks[0].resnets[0].conv1
    w_q, w_conv = to_q.weight.detach().clone(), conv1.weight.detach().clone()
    pipe.load_lora_weights(str(path), adapter_name="nekoya")
    assert abs(render() - base).mean() > 1e-3
    pipe.fuse_lora()
    # diffusers applies exactly up @ down * alpha / rank (fp16 file precision)
    q_mod = net.get_submodule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    conv_mod = net.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    torch.testing.assert_close(to_q.weight.detach() - w_q, q_mod.delta_weight(), atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(conv1.weight.detach() - w_conv, conv_mod.delta_weight(), atol=2e-3, rtol=2e-2)


def _outputs(tmp_path, weights: dict[str, torch.Tensor], save_precision: str, logged: list):
    from types import SimpleNamespace

    settings = SimpleNamespace(output_dir=str(tmp_path), output_name="o", save_model_as="safetensors",
                               save_precision=save_precision, save_every_n_epochs=0, save_last_n_epochs=0,
                               save_every_n_steps=0)

    def tensors(dtype=None, copy=False):
        return {k: v.to(dtype or v.dtype, copy=True) for k, v in weights.items()}

    return saving.RunOutputs(settings, tensors, lambda step, epoch: {"ss_steps": str(step)},
                             lambda *a: None, lambda message, level="info": logged.append((level, message)))


def test_fp16_overflow_is_not_reported_as_nan_and_keeps_the_tensor_in_float(tmp_path):
    from safetensors.torch import load_file

    big = torch.full((4, 4), 1e5)  # finite in float32, infinite in fp16
    logged: list = []
    outputs = _outputs(tmp_path, {"lora_unet_a.lora_up.weight": big, "lora_unet_a.lora_down.weight": torch.ones(4, 4)},
                       "fp16", logged)
    path = outputs.save("final", step=3, epoch=1)
    stored = load_file(path)
    assert stored["lora_unet_a.lora_up.weight"].dtype == torch.float32
    assert torch.equal(stored["lora_unet_a.lora_up.weight"], big)
    assert stored["lora_unet_a.lora_down.weight"].dtype == torch.float16
    assert [level for level, _ in logged] == ["warning"]
    assert "save_precision" in logged[0][1] and "lora_unet_a.lora_up.weight" in logged[0][1]


def test_real_nan_weights_still_stop_the_save(tmp_path):
    nan = torch.tensor([[float("nan")]])
    outputs = _outputs(tmp_path, {"lora_unet_a.lora_up.weight": nan}, "fp16", [])
    with pytest.raises(saving.NonFiniteWeights):
        outputs.save("final", step=3, epoch=1)
    assert not list(tmp_path.iterdir())
