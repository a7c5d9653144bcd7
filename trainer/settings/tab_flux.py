"""FLUX.1 settings: kohya_ss's Flux.1 accordion (``kohya_gui/class_flux1.py``), shown when the family is picked.

Labels, defaults and choices are kohya_ss's. The family's checkbox, ``flux1_checkbox``, sits with the other model
checkboxes (``tab_source_folders.py``). The Flux1 LoRA type's network settings (split_qkv, the per-module ranks, in_dims,
the block selections) are read as sd-scripts' ``networks.lora_flux`` reads them (``trainer/flux_lora_args.py``). The keys of that accordion Nekoya does not apply yet stay in
``kohya_unused.py`` (kept and written back; the check names them when they are set).
"""
from __future__ import annotations

from pydantic import BaseModel

from trainer.flux_lora_args import BLOCK_SELECTIONS

from . import tab_parameters  # noqa: F401  (declared first: the GUI shows the Flux.1 section after its sections)
from .field import setting

TAB = "Parameters"
SECTION = "Flux.1"
ONLY_FLUX = {"flux1_checkbox": (True,)}  # shown when kohya's Flux.1 checkbox is ticked
LAYER_RANKS = "Rank for layers"
_RANK_HELP = ("Flux1 LoRA type: the rank of {} (sd-scripts' networks.lora_flux {}); empty: the Network Rank, "
              "0: not trained.")
_BLOCKS_HELP = ("Flux1 LoRA type: the {} blocks trained, as a list of integers or ranges, like '0,1,5,8' or '0,1,4-5,7' "
                "or 'all' or 'none'. The number of {} blocks is {}.")


def _rank(label: str, what: str) -> str:
    return setting("", label=label, tab=TAB, section=LAYER_RANKS, visible_when=ONLY_FLUX,
                   help=_RANK_HELP.format(what, label))


class FluxSettings(BaseModel):
    model_type: str = setting(
        "flux", label="Base Model Type", tab=TAB, section=SECTION, choices=("flux", "chroma"), visible_when=ONLY_FLUX,
        help="flux: FLUX.1 dev or schnell. chroma is not trained by Nekoya yet.",
    )
    ae: str = setting(
        "", label="VAE Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_FLUX,
        help="The FLUX autoencoder (ae.safetensors). Not needed for a diffusers FLUX folder.",
    )
    clip_l: str = setting(
        "", label="CLIP-L Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_FLUX,
        help="The CLIP-L text encoder (clip_l.safetensors). Not needed for a diffusers FLUX folder.",
    )
    t5xxl: str = setting(
        "", label="T5-XXL Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_FLUX,
        help="The T5-XXL text encoder (t5xxl_fp16.safetensors or fp8). Its tokenizer is read from the same folder "
        "(tokenizer.json or spiece.model) or the local Hugging Face cache of google/t5-v1_1-xxl.",
    )
    discrete_flow_shift: float = setting(
        3.0, label="Discrete Flow Shift", tab=TAB, section=SECTION, ge=-1024, le=1024, visible_when=ONLY_FLUX,
        help="Discrete flow shift for the Euler Discrete Scheduler, default is 3.0",
    )
    model_prediction_type: str = setting(
        "sigma_scaled", label="Model Prediction Type", tab=TAB, section=SECTION,
        choices=("raw", "additive", "sigma_scaled"), visible_when=ONLY_FLUX,
        help="How the prediction is read, as sd-scripts: raw (as is), additive (plus the noisy input), "
        "sigma_scaled (times -sigma plus the noisy input).",
    )
    timestep_sampling: str = setting(
        "sigma", label="Timestep Sampling", tab=TAB, section=SECTION,
        choices=("flux_shift", "sigma", "shift", "sigmoid", "uniform"), visible_when=ONLY_FLUX,
        help="How timesteps are drawn: sigma (the shifted scheduler table), uniform, sigmoid of a normal, "
        "shift (sigmoid shifted by Discrete Flow Shift), flux_shift (FLUX.1's resolution-dependent shift).",
    )
    sigmoid_scale: float = setting(
        1.0, label="Sigmoid Scale", tab=TAB, section=SECTION, ge=0.0001, le=100, visible_when=ONLY_FLUX,
        help="sd-scripts' --sigmoid_scale: scale of the normal draw for sigmoid, shift and flux_shift sampling.",
    )
    apply_t5_attn_mask: bool = setting(
        False, label="Apply T5 Attention Mask", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Apply attention mask to T5-XXL encode and FLUX double blocks ",
    )
    split_mode: bool = setting(
        False, label="Split Mode", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Split mode for Flux1: as kohya_ss, only the single blocks are trained (train_blocks=single).",
    )
    split_qkv: bool = setting(
        False, label="Split QKV", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Split the projection layers of q/k/v/txt in the attention: the Flux1 LoRA type trains separate q, k, v "
        "(and single blocks' MLP input) LoRAs on the fused layers; the file keeps sd-scripts' keys.",
    )
    train_t5xxl: bool = setting(
        False, label="Train T5-XXL", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Train T5-XXL model (its LoRA keys are lora_te3_...; needs a text encoder learning rate)",
    )
    t5xxl_lr: float = setting(
        0, label="T5XXL learning rate", tab=TAB, section=SECTION, ge=0, le=1, visible_when=ONLY_FLUX,
        help="Flux/SD3 only. The T5-XXL LoRA's learning rate (Train T5-XXL); 0: the Text Encoder learning rate. "
        "Needs a Text Encoder learning rate above 0, as in kohya_ss.",
    )
    guidance_scale: float = setting(
        3.5, label="Guidance Scale", tab=TAB, section=SECTION, ge=0, le=1024, visible_when=ONLY_FLUX,
        help="Guidance scale for Flux1 (the guidance embedding of FLUX.1 dev, in training and samples)",
    )
    t5xxl_max_token_length: int = setting(
        512, label="T5-XXL Max Token Length", tab=TAB, section=SECTION, ge=0, le=4096, visible_when=ONLY_FLUX,
        help="Max token length for T5-XXL",
    )
    flux1_cache_text_encoder_outputs: bool = setting(
        False, label="Cache Text Encoder Outputs", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Encode captions once; the text encoders are then not trained and leave GPU memory.",
    )
    flux1_cache_text_encoder_outputs_to_disk: bool = setting(
        False, label="Cache Text Encoder Outputs to Disk", tab=TAB, section=SECTION, visible_when=ONLY_FLUX,
        help="Turns caching on, as in sd-scripts; Nekoya keeps the outputs in memory (the LoRA is the same).",
    )
    # --- kohya_ss's "Blocks to train" and "Rank for layers" (passed with the Flux1 LoRA type) -------------------
    train_double_block_indices: str = setting(
        "all", label="train_double_block_indices", tab=TAB, section="Blocks to train", visible_when=ONLY_FLUX,
        help=_BLOCKS_HELP.format("double", "double", BLOCK_SELECTIONS["train_double_block_indices"]),
    )
    train_single_block_indices: str = setting(
        "all", label="train_single_block_indices", tab=TAB, section="Blocks to train", visible_when=ONLY_FLUX,
        help=_BLOCKS_HELP.format("single", "single", BLOCK_SELECTIONS["train_single_block_indices"]),
    )
    img_attn_dim: str = _rank("img_attn_dim", "the double blocks' image attention (qkv, proj)")
    img_mlp_dim: str = _rank("img_mlp_dim", "the double blocks' image MLP")
    img_mod_dim: str = _rank("img_mod_dim", "the double blocks' image modulation")
    single_dim: str = _rank("single_dim", "the single blocks' linear1 and linear2")
    txt_attn_dim: str = _rank("txt_attn_dim", "the double blocks' text attention (qkv, proj)")
    txt_mlp_dim: str = _rank("txt_mlp_dim", "the double blocks' text MLP")
    txt_mod_dim: str = _rank("txt_mod_dim", "the double blocks' text modulation")
    single_mod_dim: str = _rank("single_mod_dim", "the single blocks' modulation")
    in_dims: str = setting(
        "", label="in_dims", tab=TAB, section=LAYER_RANKS, visible_when=ONLY_FLUX,
        help="Flux1 LoRA type: ranks for img_in, time_in, vector_in, guidance_in, txt_in, e.g. [4,0,0,0,4] "
        "(0: no LoRA there); empty: none of them is trained.",
    )
