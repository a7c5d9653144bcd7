"""A FLUX.1 LoRA Nekoya trains loads in diffusers' FluxPipeline (``load_lora_weights``, which converts kohya-form
FLUX LoRAs) and changes its output.

diffusers' converter splits single blocks' ``linear1`` at FLUX.1's full width (3072 x 3 + 12288), so the model
here has FLUX.1's width with one double and one single block (540 M parameters, about 2 GB in fp32) and the tiny
CLIP-L, T5 and AE. Slow: about a minute on 2 CPU cores.
"""
from __future__ import annotations

import pytest
import torch

from test_train import images, tiny_settings  # noqa: F401  (images is a fixture)
from trainer.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wide_flux_dir(tmp_path_factory):
    import diffusers

    from trainer.devtools.tiny_flux import tiny_flux_parts

    parts = tiny_flux_parts(seed=0, guidance=True)
    torch.manual_seed(0)
    parts["transformer"] = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=32,
                                                            pooled_projection_dim=32, guidance_embeds=True)
    folder = tmp_path_factory.mktemp("wide_flux") / "model"
    diffusers.FluxPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_trained_lora_loads_in_diffusers_flux_pipeline_and_changes_its_output(wide_flux_dir, images, tmp_path):
    import diffusers

    settings = tiny_settings(wide_flux_dir, images, tmp_path / "out", flux1_checkbox=True, LoRA_type="Flux1",
                             max_train_steps=2, t5xxl_max_token_length=16)
    result = train(settings)
    assert result.status == "finished", result.error
    pipe = diffusers.FluxPipeline.from_pretrained(wide_flux_dir, local_files_only=True)

    def image():
        return pipe("a photo of sks dog", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = image()
    pipe.load_lora_weights(str(tmp_path / "out" / "tiny.safetensors"))
    # every module was taken: img/txt qkv split into q, k, v (7 Linears per stream), linear1 into q, k, v, mlp (6)
    transformer_loras = [n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    clip_loras = [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(transformer_loras) == 2 * 7 + 6 and len(clip_loras) == 2 * 6
    after = image()
    assert abs(after - before).mean() > 1e-3
