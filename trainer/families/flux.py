"""FLUX.1 dev and schnell: BFL-layout transformer, CLIP-L pooled + T5-XXL conditioning, rectified flow.

Training follows sd-scripts' ``flux_train_network.py``: latents are packed into 2x2 patches, the
transformer sees timesteps / 1000, dev's guidance embedding gets ``guidance_scale``, the prediction is
read as ``model_prediction_type`` says and the target is ε - x_0 (``trainer.families.flow_matching``).
LoRA names are ``networks.lora_flux``'s: every Linear of the double and single blocks under ``lora_unet``,
CLIP-L's attention/MLP under ``lora_te1`` and, with ``train_t5xxl``, T5's under ``lora_te3``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from trainer.families.base import LogFn
from trainer.families.flow_matching import FlowConfig, FlowMatchingSchedule
from trainer.families.flux_load import AE_SCALING, AE_SHIFT
from trainer.families.flux_spec import FLUX1
from trainer.families.sd import _file_identity, vae_input
from trainer.flux_lora_args import IN_EMBEDDERS
from trainer.lora_types import FLUX_LORA, TYPES
from trainer.network.metadata import VersionInfo
from trainer.network.targets import CLIP_CLASSES, LoraTarget, Role

DOUBLE_BLOCK, SINGLE_BLOCK = "DoubleStreamBlock", "SingleStreamBlock"
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense")
CLIP_TOKENS = 77
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


class FluxConditioning(NamedTuple):
    pooled: torch.Tensor  # (B, 768) CLIP-L pooled output
    t5: torch.Tensor  # (B, L, 4096) T5-XXL last hidden state
    t5_mask: torch.Tensor  # (B, L) 1 for real tokens (and EOS), 0 for padding


class FluxFamily:
    spec = FLUX1
    cache_suffix = "flux1"
    v_prediction = False

    def __init__(self, settings: Any) -> None:
        self.flow = FlowMatchingSchedule(FlowConfig.from_settings(settings))
        self.guidance_scale = float(settings.guidance_scale)
        self.t5_max_length = int(settings.t5xxl_max_token_length or 512)
        self.apply_t5_attn_mask = bool(settings.apply_t5_attn_mask)
        # caching to disk turns caching on in sd-scripts (Nekoya caches in memory either way)
        self.cache_text_encoder_outputs = bool(settings.flux1_cache_text_encoder_outputs or
                                               settings.flux1_cache_text_encoder_outputs_to_disk)
        self.train_t5xxl = bool(settings.train_t5xxl)
        self.single_blocks_only = bool(settings.split_mode)  # kohya_ss: split_mode sends train_blocks=single
        # Flux1's in_dims (or ranks from a weights file, which may name them): LoRA on the input embedders too
        lora_type = TYPES.get(getattr(settings, "LoRA_type", ""))
        self.train_embedders = bool(lora_type and lora_type.network_module == FLUX_LORA and (
            str(getattr(settings, "in_dims", "") or "").strip() or getattr(settings, "dim_from_weights", False)))
        self.unet = self.vae = self.tokenizer = self.t5_tokenizer = None
        self.text_encoders: tuple = ()
        self.latent_scale, self.latent_shift = AE_SCALING, AE_SHIFT  # the AE's config may say otherwise (load)
        self._fingerprint = ""

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def guidance_embed(self) -> bool:
        return bool(self.unet.config.guidance_embed)

    # -- loading ------------------------------------------------------------------------
    @staticmethod
    def empty_models(path) -> tuple:
        """(transformer, text encoders) of the model at ``path`` without weights (the LoRA tools' checks)."""
        from trainer.families.flux_load import empty_flux_models

        return empty_flux_models(path)

    @staticmethod
    def denoiser_for_merge(path) -> torch.nn.Module:
        """The transformer alone, in fp32, for merging LoRAs into it: FLUX.1 checkpoints are saved as BFL
        transformer files (as sd-scripts' flux_merge_lora), the text encoders being files of their own."""
        from pathlib import Path

        from trainer.families.flux_load import load_transformer

        return load_transformer(Path(path), torch.float32)

    def load(self, settings: Any, base_dtype: torch.dtype, device: torch.device, log: LogFn) -> None:
        from trainer.families.flux_load import load_flux

        parts = load_flux(settings, base_dtype)
        self.unet, self.vae = parts.transformer, parts.vae
        self.text_encoders = (parts.clip, parts.t5)
        self.tokenizer, self.t5_tokenizer = parts.clip_tokenizer, parts.t5_tokenizer
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.latent_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False)
            model.eval()
            model.to(device)
        self._fingerprint = f"{_file_identity(settings.ae or settings.pretrained_model_name_or_path)}|{base_dtype}"
        kind = "dev (guidance embedding)" if self.guidance_embed else "schnell"
        log(f"FLUX.1 {kind}: {self.unet.config.depth} double and {self.unet.config.depth_single_blocks} single blocks",
            "info")

    def fingerprint(self) -> str:
        return self._fingerprint

    def lora_targets(self) -> list[LoraTarget]:
        """What this run trains: the blocks (single only with split_mode), CLIP-L unless its outputs are cached,
        T5 with train_t5xxl."""
        blocks = (SINGLE_BLOCK,) if self.single_blocks_only else (DOUBLE_BLOCK, SINGLE_BLOCK)
        targets = [LoraTarget("lora_unet", self.unet, blocks, Role.UNET)]
        if self.train_embedders:  # sd-scripts' in_dims modules: lora_unet_img_in, lora_unet_time_in_in_layer...
            targets += [LoraTarget("lora_unet", module, (type(module).__name__,), Role.UNET, path_prefix=name)
                        for name in IN_EMBEDDERS if not isinstance(module := getattr(self.unet, name), torch.nn.Identity)]
        if self.cache_text_encoder_outputs:  # cached outputs cannot carry text-encoder gradients
            return targets
        return targets + self._text_targets(t5=self.train_t5xxl)

    def all_lora_targets(self) -> list[LoraTarget]:
        """Every target a FLUX.1 LoRA file may name (the LoRA tools': T5's too)."""
        return [LoraTarget("lora_unet", self.unet, (DOUBLE_BLOCK, SINGLE_BLOCK), Role.UNET), *self._text_targets(t5=True)]

    def _text_targets(self, t5: bool) -> list[LoraTarget]:
        if not self.text_encoders:  # the transformer alone (merging into a transformer file)
            return []
        clip = self.text_encoders[0]
        targets = [LoraTarget("lora_te1", clip, CLIP_CLASSES, Role.TEXT_ENCODER,
                              path_prefix="" if hasattr(clip, "text_model") else "text_model.")]
        if t5 and len(self.text_encoders) > 1:
            targets.append(LoraTarget("lora_te3", self.text_encoders[1], T5_CLASSES, Role.TEXT_ENCODER))
        return targets

    def version_metadata(self) -> VersionInfo:
        variant = "dev" if self.guidance_embed else "schnell"
        return VersionInfo(base_model_version="flux1", v2=False, architecture=f"flux-1-{variant}",
                           implementation=FLUX_IMPLEMENTATION, prediction_type="epsilon")

    # -- the diffusion formulation ------------------------------------------------------
    def noise_schedule(self, device: torch.device | str) -> FlowMatchingSchedule:
        return self.flow

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_shift) * self.latent_scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale + self.latent_shift

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, captions: list[str], max_token_length: int = 0) -> torch.Tensor:
        """(B, 77 + L): CLIP-L's ids, then T5's (L = t5xxl_max_token_length); max_token_length is CLIP's 75."""
        clip = self.tokenizer(captions, padding="max_length", truncation=True, max_length=CLIP_TOKENS,
                              return_tensors="pt").input_ids
        t5 = self.t5_tokenizer(captions, padding="max_length", truncation=True, max_length=self.t5_max_length,
                               return_tensors="pt").input_ids
        return torch.cat([clip, t5], dim=1)

    def encode_prompt(self, tokens: torch.Tensor, clip_skip: int = 0) -> FluxConditioning:
        clip, t5 = self.text_encoders
        clip_ids, t5_ids = tokens[:, :CLIP_TOKENS].to(clip.device), tokens[:, CLIP_TOKENS:].to(t5.device)
        mask = (t5_ids != self.t5_tokenizer.pad_token_id).long()
        pooled = clip(clip_ids).pooler_output
        states = t5(t5_ids, attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        return FluxConditioning(pooled, states, mask)

    def select_prompt(self, cond: FluxConditioning, index: int) -> FluxConditioning:
        return FluxConditioning(cond.pooled[index], cond.t5[index], cond.t5_mask[index])

    def stack_prompts(self, conds: list[FluxConditioning]) -> FluxConditioning:
        return FluxConditioning(*(torch.stack(parts) for parts in zip(*conds)))

    # -- images and the transformer ----------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(vae_input(self.vae, pixels)).latent_dist.sample(generator=generator)

    def transformer_output(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning,
                           guidance: float) -> torch.Tensor:
        """The transformer's raw output for unpacked latents, unpacked again (sd-scripts' call_dit)."""
        from trainer.models.flux import image_ids, pack_latents, unpack_latents

        batch, _, height, width = noisy.shape
        device, dtype = noisy.device, noisy.dtype  # the run's precision (the weights may be stored in fp8)
        t5 = cond.t5.to(device)
        # as sd-scripts: timesteps in the run's precision, then / 1000; positions and guidance in fp32
        timesteps = timesteps.reshape(-1).expand(batch).to(device=device, dtype=dtype)
        out = self.unet(
            pack_latents(noisy), image_ids(batch, height // 2, width // 2, device), t5,
            torch.zeros(batch, t5.shape[1], 3, device=device), timesteps / self.flow.num_train_timesteps,
            cond.pooled.to(device), torch.full((batch,), float(guidance), device=device),
            cond.t5_mask.to(device) if self.apply_t5_attn_mask else None,
        )
        return unpack_latents(out, height // 2, width // 2)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning, batch: Any) -> torch.Tensor:
        pred = self.transformer_output(noisy, timesteps, cond, self.guidance_scale)
        return self.flow.apply_prediction_type(pred, noisy, timesteps)

    def denoise(self, spec: Any, cond: FluxConditioning, progress, device, autocast) -> torch.Tensor:
        """Sample latents (unscaled by ``unscale_latents`` later): FLUX.1's Euler loop over its shifted
        schedule (``trainer.families.flux_sampling``); dev is guided by its embedding, not by CFG."""
        from trainer.families.flux_sampling import euler_sample

        return euler_sample(self, spec, cond, progress, device, autocast)

    def set_attention(self, backend: str, log: LogFn) -> None:
        if backend == "xformers":
            log("FLUX.1 runs PyTorch SDPA attention (xformers is not used for it)", "warning")

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self.unet.enable_gradient_checkpointing()
        if text_encoders:
            for encoder in self.text_encoders:
                encoder.gradient_checkpointing_enable()
                encoder.train()

    def release_vae(self) -> None:
        self.vae.to("cpu")

    def release_text_encoders(self) -> None:
        for encoder in self.text_encoders:
            encoder.to("cpu")
