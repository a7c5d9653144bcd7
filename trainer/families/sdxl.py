"""Stable Diffusion XL: two CLIP text encoders, pooled embedding and size/crop conditioning.

Conditioning follows sd-scripts (``strategy_sdxl``): the penultimate hidden state
of each text encoder without the final LayerNorm (CLIP-L ``hidden_states[11]``,
OpenCLIP-G ``hidden_states[-2]``), concatenated to 2048 channels; the pooled
vector is OpenCLIP-G's final-LN state at the first EOS token through
``text_projection``. LoRA keys use the SGM block names (``trainer.network.sgm_names``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from trainer.families.clip_text import CHUNK, tokenize_chunks
from trainer.families.sd import StableDiffusionFamily, vae_input
from trainer.families.stable_diffusion import SDXL
from trainer.network.metadata import VersionInfo
from trainer.network.sgm_names import SGM_CONV_CLASSES, sgm_unet_view
from trainer.network.targets import CLIP_CLASSES, UNET_ATTENTION_CLASSES, LoraTarget, Role

SDXL_VERSION = "sdxl_base_v1-0"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")


class SDXLConditioning(NamedTuple):
    hidden_states: torch.Tensor  # (B, tokens, te1 + te2 channels), 2048 for real SDXL
    pooled: torch.Tensor  # (B, projection_dim), 1280 for real SDXL


class SDXLFamily(StableDiffusionFamily):
    spec = SDXL
    latent_scale = 0.13025
    cache_suffix = "sdxl"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.cache_text_encoder_outputs = bool(settings.sdxl_cache_text_encoder_outputs)
        self.no_half_vae = bool(settings.sdxl_no_half_vae)
        self.tokenizers: tuple = ()

    # -- loading ------------------------------------------------------------------------
    def _take_components(self, parts: Any) -> None:
        self.unet, self.vae = parts.unet, parts.vae
        self.text_encoders, self.tokenizers = tuple(parts.text_encoders), tuple(parts.tokenizers)
        self.tokenizer = self.tokenizers[0]

    def _vae_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.no_half_vae else base_dtype

    def _prediction_mismatch(self) -> str:
        said, wanted = ("epsilon", "v-prediction") if self.v_prediction else ("v-prediction", "epsilon")
        return f"the model's scheduler says {said}; training {wanted} as v_parameterization says"

    def _setting_notes(self, settings: Any) -> list[str]:
        notes = []
        if int(settings.clip_skip or 0) > 1:
            notes.append(f"clip_skip {settings.clip_skip} is ignored for SDXL: it always uses the penultimate layer "
                         "of both text encoders, as sd-scripts does")
        if self.cache_text_encoder_outputs and settings.train_lrs()[1] > 0:
            notes.append("sdxl_cache_text_encoder_outputs: the text encoders are not trained (UNet only); "
                         "the text encoder learning rate is taken as 0")
        return notes

    def lora_targets(self) -> list[LoraTarget]:
        targets = [LoraTarget("lora_unet", sgm_unet_view(self.unet), UNET_ATTENTION_CLASSES, Role.UNET,
                              SGM_CONV_CLASSES)]
        if self.cache_text_encoder_outputs:  # cached outputs cannot carry text-encoder gradients
            return targets
        for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, self.text_encoders):
            # transformers 5's CLIPTextModel lacks the ``text_model`` level that sd-scripts' keys carry
            path_prefix = "" if hasattr(encoder, "text_model") else "text_model."
            targets.append(LoraTarget(prefix, encoder, CLIP_CLASSES, Role.TEXT_ENCODER, path_prefix=path_prefix))
        return targets

    def version_metadata(self) -> VersionInfo:
        return VersionInfo(
            base_model_version=SDXL_VERSION,
            v2=False,
            architecture=SDXL_ARCHITECTURE,
            implementation=SDXL_IMPLEMENTATION,
            prediction_type="v" if self.v_prediction else "epsilon",
        )

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, captions: list[str], max_token_length: int) -> torch.Tensor:
        """(B, 2, n_chunks, 77): the ids of both tokenizers (they pad differently)."""
        return torch.stack([tokenize_chunks(t, captions, max_token_length) for t in self.tokenizers], dim=1)

    def encode_prompt(self, tokens: torch.Tensor, clip_skip: int) -> SDXLConditioning:
        te1, te2 = self.text_encoders
        batch, _, n_chunks, length = tokens.shape
        ids1 = tokens[:, 0].reshape(batch * n_chunks, length).to(te1.device)
        ids2 = tokens[:, 1].reshape(batch * n_chunks, length).to(te2.device)
        hidden1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        pooled = eos_pooled(te2, out2.last_hidden_state, ids2, self.tokenizers[1].eos_token_id)
        hidden = torch.cat([join_chunks(hidden1, batch, n_chunks), join_chunks(out2.hidden_states[-2], batch, n_chunks)],
                           dim=-1)
        return SDXLConditioning(hidden, pooled.reshape(batch, n_chunks, -1)[:, 0])  # pooled of the first chunk

    def tokenize_weighted(self, captions: list[str], max_token_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, n_chunks, 77) ids of both tokenizers and the per-token weights (weighted_captions); the two
        tokenizers share one vocabulary, so the weights are the same for both halves of the hidden states."""
        from trainer.families.prompts import tokenize_weighted

        both = [tokenize_weighted(t, captions, max_token_length) for t in self.tokenizers]
        return torch.stack([ids for ids, _ in both], dim=1), both[0][1]

    def weight_prompt(self, cond: SDXLConditioning, weights: torch.Tensor) -> SDXLConditioning:
        from trainer.families.prompts import weight_hidden_states

        return SDXLConditioning(weight_hidden_states(cond.hidden_states, weights), cond.pooled)

    def select_prompt(self, cond: SDXLConditioning, index: int) -> SDXLConditioning:
        return SDXLConditioning(cond.hidden_states[index], cond.pooled[index])

    def stack_prompts(self, conds: list[SDXLConditioning]) -> SDXLConditioning:
        return SDXLConditioning(torch.stack([c.hidden_states for c in conds]), torch.stack([c.pooled for c in conds]))

    # -- images and the UNet ---------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """As ``StableDiffusionFamily.encode_images`` (``generator`` may be a list, one per image)."""
        # Outside autocast, so sdxl_no_half_vae really runs the VAE in fp32.
        with torch.no_grad(), torch.autocast(self.vae.device.type, enabled=False):
            dist = self.vae.encode(vae_input(self.vae, pixels)).latent_dist
            return dist.sample(generator=generator)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: SDXLConditioning, batch: Any) -> torch.Tensor:
        time_ids = batch.size_conditioning().to(noisy.device, torch.float32)
        added = {"text_embeds": cond.pooled.to(noisy.device), "time_ids": time_ids}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond.hidden_states.to(noisy.device),
                         added_cond_kwargs=added)


def join_chunks(states: torch.Tensor, batch: int, n_chunks: int) -> torch.Tensor:
    """(B*n, 77, D) per-chunk states -> (B, n*75 + 2, D): BOS, 75 states per chunk, last token."""
    states = states.reshape(batch, n_chunks, states.shape[-2], states.shape[-1])
    if n_chunks == 1:
        return states[:, 0]
    middle = states[:, :, 1 : 1 + CHUNK].reshape(batch, n_chunks * CHUNK, -1)
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)


def eos_pooled(encoder, last_hidden_state: torch.Tensor, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The final-LN state at each sequence's first EOS token, through ``text_projection`` (sd-scripts' pool)."""
    eos_index = (ids == eos_token_id).int().argmax(dim=1).to(last_hidden_state.device)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_index]
    projection = encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)
