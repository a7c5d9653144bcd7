"""SD 3 / 3.5 (Medium, Large): SAI-layout MMDiT, CLIP-L + CLIP-G + T5-XXL conditioning, rectified flow.

Training follows sd-scripts' ``sd3_train_network.py``: timesteps are integers drawn as ``weighting_scheme`` says
(logit_normal/mode densities, uniform otherwise; ``sd3_train_utils.get_noisy_model_input_and_timesteps``), the
input is (1 - σ)·x_0 + σ·ε, the output is preconditioned as pred·(-σ) + x_t and the target is x_0
(``trainer.families.flow_matching`` with ``sample_target``). Conditioning is ``Sd3TextEncodingStrategy``'s: CLIP-L
and CLIP-G's penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens; the pooled
vector is both CLIPs' projected outputs. LoRA names are ``networks.lora_sd3``'s: every Linear of each joint
block's x and context ``SingleDiTBlock`` under ``lora_unet``, CLIP-L's and CLIP-G's attention/MLP under
``lora_te1`` / ``lora_te2`` (T5 under ``lora_te3``, which kohya_ss never asks sd-scripts to train for SD3).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from trainer.families.base import LogFn
from trainer.families.flow_matching import SD3_SAMPLING, FlowConfig, FlowMatchingSchedule
from trainer.families.sd import _file_identity, vae_input
from trainer.families.sd3_dropout import drop_conditioning, dropout_rates, dropped_encoders
from trainer.families.sd3_spec import SD3
from trainer.network.metadata import VersionInfo
from trainer.network.targets import CLIP_CLASSES, LoraTarget, Role

JOINT_STREAM = "SingleDiTBlock"
T5_CLASSES = ("T5Attention", "T5DenseGatedActDense")
CLIP_TOKENS = 77
T5_TOKENS = 256  # sd-scripts' SD3 --t5xxl_max_token_length default (kohya_ss passes its field to FLUX runs only)
SD3_LORA = "networks.lora_sd3"  # kohya_ss runs sd-scripts' networks.lora_sd3 for a Standard LoRA with SD3 ticked
SD3_IMPLEMENTATION = "diffusers"  # sd-scripts' determine_implementation for an SD3 LoRA


class SD3Conditioning(NamedTuple):
    context: torch.Tensor  # (B, 77 + T5 tokens, T5 width): CLIP-L|G penultimate states padded, then T5's
    pooled: torch.Tensor  # (B, 768 + 1280) CLIP-L and CLIP-G projected pooled outputs


class SD3Family:
    spec = SD3
    cache_suffix = "sd3"
    v_prediction = False

    def __init__(self, settings: Any) -> None:
        self.flow = FlowMatchingSchedule(FlowConfig(
            timestep_sampling=SD3_SAMPLING, model_prediction_type="sigma_scaled", sample_target=True,
            weighting_scheme=settings.weighting_scheme, logit_mean=float(settings.logit_mean),
            logit_std=float(settings.logit_std), mode_scale=float(settings.mode_scale),
        ))
        self.cache_text_encoder_outputs = bool(settings.sd3_cache_text_encoder_outputs)
        self.dropout_rates = dropout_rates(settings)  # CLIP-L, CLIP-G, T5 (trainer.families.sd3_dropout)
        self.pos_crop_rate = float(getattr(settings, "pos_emb_random_crop_rate", 0.0) or 0.0)  # sd3_pos_embed
        self.unet = self.vae = None
        self.text_encoders: tuple = ()
        self.tokenizers: tuple = ()
        self.latent_scale, self.latent_shift = 1.5305, 0.0609
        self._fingerprint = ""

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def tokenizer(self):  # the CLIP-L tokenizer (what shared code reads a family's ``tokenizer`` for)
        return self.tokenizers[0] if self.tokenizers else None

    # -- loading ------------------------------------------------------------------------
    @staticmethod
    def empty_models(path) -> tuple:
        """(MMDiT, text encoders) of the model at ``path`` without weights (the LoRA tools' checks)."""
        from trainer.families.sd3_load import empty_sd3_models

        return empty_sd3_models(path)

    @staticmethod
    def denoiser_for_merge(path) -> torch.nn.Module:
        """The MMDiT alone, in fp32, for merging LoRAs into it: the result is a SAI-layout MMDiT file (which
        ComfyUI's diffusion-model loader and Nekoya load with the separate encoder files); the text-encoder modules
        are reported as not merged."""
        from trainer.families.sd3_load import load_mmdit

        return load_mmdit(path, torch.float32)

    def load(self, settings: Any, base_dtype: torch.dtype, device: torch.device, log: LogFn) -> None:
        from trainer.families.sd3_load import load_sd3

        parts = load_sd3(settings, base_dtype)
        self.unet, self.vae = parts.transformer, parts.vae
        self.text_encoders = (parts.clip_l, parts.clip_g, parts.t5)
        self.tokenizers = parts.tokenizers
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.latent_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False)
            model.eval()
            model.to(device)
        self._fingerprint = f"{_file_identity(settings.vae or settings.pretrained_model_name_or_path)}|{base_dtype}"
        if getattr(settings, "sd3_enable_scaled_pos_embed", False):
            self._scale_positions(settings, log)
        c = self.unet.config
        kind = "3.5 (q/k norm)" if c.qk_norm else "3"
        extra = f", MMDiT-X self-attention in {len(c.x_block_self_attn_layers)}" if c.x_block_self_attn_layers else ""
        log(f"SD {kind}: {c.depth} joint blocks of width {c.hidden_size}{extra}", "info")

    def fingerprint(self) -> str:
        return self._fingerprint

    def _scale_positions(self, settings: Any, log: LogFn) -> None:
        """sd-scripts' enable_scaled_pos_embed: one scaled table per dataset resolution's latent size."""
        from trainer.data.dataset_config import dataset_config_path, load_dataset_config
        from trainer.families.sd3_pos_embed import ScaledPositions, latent_sizes

        resolutions = ([d.resolution for d in load_dataset_config(settings).datasets]
                       if dataset_config_path(settings) else [settings.resolution])
        sizes = latent_sizes(resolutions)
        self.unet.scaled_positions = ScaledPositions(self.unet.config.hidden_size, self.unet.config.patch_size, sizes)
        log(f"SD3 scaled position embeddings for latent sizes {', '.join(map(str, sizes))} "
            f"(resolutions {', '.join(f'{w}x{h}' for w, h in resolutions)})", "info")

    def lora_targets(self) -> list[LoraTarget]:
        """The joint blocks, and CLIP-L and CLIP-G unless their outputs are cached (sd-scripts' SD3 defaults)."""
        targets = [LoraTarget("lora_unet", self.unet, (JOINT_STREAM,), Role.UNET)]
        if self.cache_text_encoder_outputs:  # cached outputs cannot carry text-encoder gradients
            return targets
        return targets + self._text_targets(t5=False)

    def all_lora_targets(self) -> list[LoraTarget]:
        """Every target an SD3 LoRA file may name (the LoRA tools': T5's too)."""
        return [LoraTarget("lora_unet", self.unet, (JOINT_STREAM,), Role.UNET), *self._text_targets(t5=True)]

    def _text_targets(self, t5: bool) -> list[LoraTarget]:
        prefixes = ("lora_te1", "lora_te2", "lora_te3") if t5 else ("lora_te1", "lora_te2")
        targets = []
        for prefix, encoder in zip(prefixes, self.text_encoders):
            classes = T5_CLASSES if prefix == "lora_te3" else CLIP_CLASSES
            targets.append(LoraTarget(prefix, encoder, classes, Role.TEXT_ENCODER))
        return targets

    @property
    def model_type(self) -> str:
        """sd-scripts' ``sd3_utils.analyze_state_dict_state`` name: q/k norm is 3.5, MMDiT-X 3.5 Medium."""
        c = self.unet.config
        if c.qk_norm is None:
            return "medium"
        return "5-medium" if c.x_block_self_attn_layers else "5-large"

    def version_metadata(self) -> VersionInfo:
        return VersionInfo(base_model_version="sd3", v2=False, architecture=f"stable-diffusion-3-{self.model_type}",
                           implementation=SD3_IMPLEMENTATION, prediction_type="epsilon", lora_module=SD3_LORA)

    # -- the diffusion formulation ------------------------------------------------------
    def noise_schedule(self, device: torch.device | str) -> FlowMatchingSchedule:
        return self.flow

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_shift) * self.latent_scale

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale + self.latent_shift

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, captions: list[str], max_token_length: int = 0) -> torch.Tensor:
        """(B, 77 + 77 + 256): CLIP-L's ids, CLIP-G's, then T5's (sd-scripts' Sd3TokenizeStrategy)."""
        clip_l, clip_g, t5 = self.tokenizers
        parts = [tok(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids
                 for tok, length in ((clip_l, CLIP_TOKENS), (clip_g, CLIP_TOKENS), (t5, T5_TOKENS))]
        return torch.cat(parts, dim=1)

    def encode_prompt(self, tokens: torch.Tensor, clip_skip: int = 0) -> SD3Conditioning:
        clip_l, clip_g, t5 = self.text_encoders
        l_ids, g_ids = tokens[:, :CLIP_TOKENS], tokens[:, CLIP_TOKENS:2 * CLIP_TOKENS]
        l_out = clip_l(l_ids.to(clip_l.device), output_hidden_states=True)
        g_out = clip_g(g_ids.to(clip_g.device), output_hidden_states=True)
        t5_states = t5(tokens[:, 2 * CLIP_TOKENS:].to(t5.device)).last_hidden_state
        lg = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2].to(l_out.hidden_states[-2])], dim=-1)
        lg = F.pad(lg, (0, t5_states.shape[-1] - lg.shape[-1]))  # sd-scripts' concat_encodings
        pooled = torch.cat([l_out.text_embeds, g_out.text_embeds.to(l_out.text_embeds)], dim=-1)
        return SD3Conditioning(torch.cat([lg, t5_states.to(lg)], dim=-2), pooled)

    def select_prompt(self, cond: SD3Conditioning, index: int) -> SD3Conditioning:
        return SD3Conditioning(cond.context[index], cond.pooled[index])

    def stack_prompts(self, conds: list[SD3Conditioning]) -> SD3Conditioning:
        return SD3Conditioning(*(torch.stack(parts) for parts in zip(*conds)))

    # -- images and the transformer ----------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(vae_input(self.vae, pixels)).latent_dist.sample(generator=generator)

    def transformer_output(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: SD3Conditioning,
                           pos_offsets=None) -> torch.Tensor:
        """The MMDiT's raw output (a velocity) in the run's precision (the weights may be stored in fp8);
        ``pos_offsets``: per sample, where its position embedding is cropped (None: the centre)."""
        batch, device, dtype = noisy.shape[0], noisy.device, noisy.dtype
        t = timesteps.float().reshape(-1).expand(batch).to(device)
        return self.unet(noisy.to(dtype), t.to(dtype), cond.pooled.to(device, dtype), cond.context.to(device, dtype),
                         pos_offsets=pos_offsets)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: SD3Conditioning, batch: Any) -> torch.Tensor:
        """sd-scripts' preconditioned output pred·(-σ) + x_t: the model's estimate of x_0. A training batch's
        conditioning first loses the encoders its samples drop (``drop_text_encoders``), and its samples' position
        embeddings are cropped at random places at pos_emb_random_crop_rate (``position_crops``)."""
        row_keys = getattr(batch, "row_keys", None) or ()
        cond = self.drop_text_encoders(cond, row_keys)
        output = self.transformer_output(noisy, timesteps, cond, self.position_crops(noisy, row_keys))
        return self.flow.apply_prediction_type(output, noisy, timesteps)

    def position_crops(self, noisy: torch.Tensor, row_keys) -> list | None:
        """Each training sample's crop of the position table (``trainer.families.sd3_pos_embed.crop_offsets``);
        None (every crop at the centre) without a rate or row keys."""
        if not self.pos_crop_rate or not row_keys:
            return None
        from trainer.families.sd3_pos_embed import crop_offsets

        p = self.unet.config.patch_size
        h, w = noisy.shape[-2] // p, noisy.shape[-1] // p
        return crop_offsets(row_keys, self.pos_crop_rate, self.unet.position_table_size(h, w), h, w)

    def drop_text_encoders(self, cond: SD3Conditioning, row_keys) -> SD3Conditioning:
        """The CLIP-L / CLIP-G / T5 dropout rates, per sample as sd-scripts (``trainer.families.sd3_dropout``):
        here, where the loop hands over the batch and its row keys, so live and cached outputs are dropped alike."""
        if not any(self.dropout_rates) or not row_keys:
            return cond
        clip_l, clip_g = self.text_encoders[0].config, self.text_encoders[1].config
        context, pooled = drop_conditioning(cond.context, cond.pooled, dropped_encoders(row_keys, self.dropout_rates),
                                            CLIP_TOKENS, (clip_l.hidden_size, clip_g.hidden_size),
                                            clip_l.projection_dim)
        return SD3Conditioning(context, pooled)

    def denoise(self, spec: Any, cond: SD3Conditioning, progress, device, autocast) -> torch.Tensor:
        """Sample latents (unscaled by ``unscale_latents`` later): sd-scripts' SD3 Euler loop with CFG
        (``trainer.families.sd3_sampling``)."""
        from trainer.families.sd3_sampling import euler_sample

        return euler_sample(self, spec, cond, progress, device, autocast)

    def set_attention(self, backend: str, log: LogFn) -> None:
        if backend == "xformers":
            log("SD3 runs PyTorch SDPA attention (xformers is not used for it)", "warning")

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self.unet.enable_gradient_checkpointing()
        if text_encoders:
            for encoder in self.text_encoders[:2]:
                encoder.gradient_checkpointing_enable()
                encoder.train()

    def release_vae(self) -> None:
        self.vae.to("cpu")

    def release_text_encoders(self) -> None:
        for encoder in self.text_encoders:
            encoder.to("cpu")
