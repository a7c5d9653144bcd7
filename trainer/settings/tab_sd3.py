"""SD 3 / 3.5 settings: kohya_ss's SD3 accordion (``kohya_gui/class_sd3.py``), shown when the family is picked.

Labels, defaults and choices are kohya_ss's (its form keys: ``sd3_clip_l``, ``clip_g``, ``sd3_t5xxl`` ... which
lora_gui.py passes to sd-scripts as --clip_l, --clip_g, --t5xxl). The keys of that accordion Nekoya does not apply
yet stay in ``kohya_unused.py`` (kept and written back; the check names them in SD3 runs when they are set).
"""
from __future__ import annotations

from pydantic import BaseModel

from .field import setting

TAB = "Parameters"
SECTION = "SD3"
ONLY_SD3 = {"sd3_checkbox": (True,)}  # shown when kohya's SD3 checkbox is ticked
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "uniform")


class SD3Settings(BaseModel):
    sd3_checkbox: bool = setting(
        False, label="SD3", tab="Source Model",
        help="Tick for Stable Diffusion 3 / 3.5 (Medium, Large): a SAI single file (with or without its text "
        "encoders; the CLIP-L, CLIP-G and T5-XXL files below fill in what it lacks) or a diffusers SD3 folder.",
    )
    weighting_scheme: str = setting(
        "logit_normal", label="Weighting Scheme", tab=TAB, section=SECTION, choices=WEIGHTING_SCHEMES,
        visible_when=ONLY_SD3,
        help="How timesteps are drawn (sd-scripts' SD3 --weighting_scheme): logit_normal (sigmoid of a normal of "
        "Logit Mean/Std), mode (Mode Scale), or uniformly (sigma_sqrt, cosmap and uniform).",
    )
    logit_mean: float = setting(
        0.0, label="Logit Mean", tab=TAB, section=SECTION, ge=-100, le=100, visible_when=ONLY_SD3,
        help="Mean of the normal that logit_normal draws timesteps from.",
    )
    logit_std: float = setting(
        1.0, label="Logit Std", tab=TAB, section=SECTION, ge=0, le=100, visible_when=ONLY_SD3,
        help="Standard deviation of the normal that logit_normal draws timesteps from.",
    )
    mode_scale: float = setting(
        1.29, label="Mode Scale", tab=TAB, section=SECTION, ge=-100, le=100, visible_when=ONLY_SD3,
        help="Scale of the mode weighting scheme.",
    )
    sd3_clip_l: str = setting(
        "", label="CLIP-L Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_SD3,
        help="CLIP-L text encoder file (clip_l.safetensors). Empty: the model file's own (text_encoders.clip_l).",
    )
    clip_g: str = setting(
        "", label="CLIP-G Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_SD3,
        help="CLIP-G text encoder file (clip_g.safetensors). Empty: the model file's own (text_encoders.clip_g).",
    )
    sd3_t5xxl: str = setting(
        "", label="T5-XXL Path", tab=TAB, section=SECTION, widget="file", visible_when=ONLY_SD3,
        help="T5-XXL text encoder file (t5xxl_fp16.safetensors or fp8). Empty: the model file's own "
        "(text_encoders.t5xxl). Its tokenizer is read from the same folder (tokenizer.json or spiece.model) or the "
        "local Hugging Face cache of google/t5-v1_1-xxl.",
    )
    sd3_cache_text_encoder_outputs: bool = setting(
        False, label="Cache Text Encoder Outputs", tab=TAB, section=SECTION, visible_when=ONLY_SD3,
        help="Cache text encoder outputs to speed up inference (the text encoders are then not trained).",
    )
    sd3_clip_l_dropout_rate: float = setting(
        0.0, label="CLIP-L Dropout Rate", tab=TAB, section=SECTION, ge=0, le=1, step=0.01, visible_when=ONLY_SD3,
        help="Chance that a training sample's CLIP-L output (its hidden states and pooled vector) is replaced by "
        "zeros, drawn for each sample at each step (sd-scripts' --clip_l_dropout_rate; cached outputs too).",
    )
    clip_g_dropout_rate: float = setting(
        0.0, label="CLIP-G Dropout Rate", tab=TAB, section=SECTION, ge=0, le=1, step=0.01, visible_when=ONLY_SD3,
        help="Chance that a training sample's CLIP-G output (its hidden states and pooled vector) is replaced by "
        "zeros, drawn for each sample at each step (sd-scripts' --clip_g_dropout_rate).",
    )
    sd3_t5_dropout_rate: float = setting(
        0.0, label="T5 Dropout Rate", tab=TAB, section=SECTION, ge=0, le=1, step=0.01, visible_when=ONLY_SD3,
        help="Chance that a training sample's T5-XXL tokens are replaced by zeros, drawn for each sample at each "
        "step (sd-scripts' --t5_dropout_rate). Sample images are never dropped.",
    )
    sd3_enable_scaled_pos_embed: bool = setting(
        False, label="Enable Scaled Positional Embeddings", tab=TAB, section=SECTION, visible_when=ONLY_SD3,
        help="Position embeddings scaled to each dataset resolution, so every resolution spans the same positions "
        "(sd-scripts' --enable_scaled_pos_embed; meant for SD 3.5 Medium). Samples use them too.",
    )
    pos_emb_random_crop_rate: float = setting(
        0.0, label="Positional Embedding Random Crop Rate", tab=TAB, section=SECTION, ge=0, le=1, step=0.01,
        visible_when=ONLY_SD3,
        help="Chance that a training sample's position embedding is cropped at a random place of the position "
        "table instead of its centre (sd-scripts' --pos_emb_random_crop_rate; meant for SD 3.5 Medium).",
    )
