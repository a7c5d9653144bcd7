"""The trained files of the types diffusers can read (lora_down/lora_up/alpha: LyCORIS LoCon, Kohya DyLoRA,
LoRA-FA) load in diffusers' StableDiffusionPipeline and change the image. LyCORIS DyLoRA writes its conv
``lora_up`` as 2-D (LyCORIS's own layout), which diffusers refuses; the other LyCORIS keys it does not read."""
from __future__ import annotations

import pytest
import torch

from test_train import images, tiny_settings  # noqa: F401  (images: a fixture)
from trainer.loop import train


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", ["LyCORIS/LoCon", "Kohya DyLoRA", "LoRA-FA"])
def test_trained_file_loads_in_diffusers_and_changes_the_image(lora_type, sd1_pipe, tiny_sd1_dir, images,  # noqa: F811
                                                               tmp_path):
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", LoRA_type=lora_type, conv_dim=4, conv_alpha=1,
                             unet_lr=0.1, text_encoder_lr=0.05, max_train_steps=3)
    result = train(settings)
    assert result.status == "finished", result.error
    base = _render(sd1_pipe)
    sd1_pipe.load_lora_weights(result.files[-1], adapter_name="t")
    try:
        assert abs(_render(sd1_pipe) - base).mean() > 1e-4
    finally:
        sd1_pipe.unload_lora_weights()
