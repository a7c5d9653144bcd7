"""Settings of the Source Model, Folders and Metadata tabs."""
from __future__ import annotations

from pydantic import BaseModel

from .field import setting
from .known_models import QUICK_PICK_CHOICES

SRC = "Source Model"
FOLDERS = "Folders"
META = "Metadata"


class SourceModelSettings(BaseModel):
    model_list: str = setting(
        "runwayml/stable-diffusion-v1-5", label="Model Quick Pick", tab=SRC,
        choices=QUICK_PICK_CHOICES,
        help="A known base model (found in the local Hugging Face cache; Nekoya never downloads), "
        "or 'custom' to give the path of your own model.",
    )
    pretrained_model_name_or_path: str = setting(
        "runwayml/stable-diffusion-v1-5", label="Pretrained model name or path", tab=SRC, widget="path",
        help="Path to a local .safetensors / .ckpt checkpoint or a diffusers model folder.",
    )
    v2: bool = setting(False, label="v2", tab=SRC, help="Tick for Stable Diffusion 2.x models.")
    v_parameterization: bool = setting(
        False, label="v_parameterization", tab=SRC,
        help="Tick for v-prediction models (SD 2.x 768, some fine-tunes).",
    )
    sdxl: bool = setting(False, label="SDXL Model", tab=SRC, help="Tick for SDXL base models.")
    flux1_checkbox: bool = setting(
        False, label="Flux.1", tab=SRC,
        help="Tick for FLUX.1 dev or schnell models (a BFL transformer file with the CLIP-L, T5-XXL and AE files "
        "of the Flux.1 section, or a diffusers FLUX folder).",
    )
    save_model_as: str = setting(
        "safetensors", label="Save trained model as", tab=SRC, choices=("ckpt", "safetensors"), widget="radio",
        help="File format of the LoRA. safetensors is safe to share and loads everywhere.",
    )
    save_precision: str = setting(
        "fp16", label="Save precision", tab=SRC, choices=("float", "fp16", "bf16"), widget="radio",
        help="Precision of the weights in the saved file.",
    )


class FolderSettings(BaseModel):
    train_data_dir: str = setting(
        "", label="Image folder", tab=FOLDERS, widget="folder",
        help="The parent folder of the training image folders, each named <repeats>_<name> (e.g. 40_sks dog).",
    )
    reg_data_dir: str = setting(
        "", label="Regularisation folder", tab=FOLDERS, widget="folder",
        help="Optional. Parent of <repeats>_<class> folders with regularisation images.",
    )
    dataset_config: str = setting(
        "", label="Dataset config file", tab=FOLDERS, widget="file",
        help="Optional. sd-scripts' dataset config (.toml): datasets and subsets, each with its folder, repeats, "
             "resolution, batch size, captions and augmentations. When set, Image folder and Regularisation "
             "folder are not used.",
    )
    output_dir: str = setting(
        "", label="Output folder", tab=FOLDERS, widget="folder",
        help="Where the trained LoRA files (and samples, state) are written.",
    )
    logging_dir: str = setting(
        "", label="Logging folder", tab=FOLDERS, widget="folder",
        help="Optional. Enables TensorBoard logs of loss and learning rate in this folder.",
    )
    output_name: str = setting(
        "last", label="Model output name", tab=FOLDERS,
        help="File name of the LoRA without extension; epochs are saved as <name>-000001.safetensors.", ss_key="ss_output_name",
    )
    training_comment: str = setting(
        "", label="Training comment", tab=FOLDERS, help="Stored in the LoRA file's metadata (ss_training_comment).", ss_key="ss_training_comment", ss_none_if_off=True,
    )


class MetadataSettings(BaseModel):
    metadata_title: str = setting("", label="Metadata title", tab=META, help="modelspec.title; defaults to the output name.")
    metadata_author: str = setting("", label="Metadata author", tab=META, help="modelspec.author")
    metadata_description: str = setting("", label="Metadata description", tab=META, widget="textarea", help="modelspec.description")
    metadata_license: str = setting("", label="Metadata license", tab=META, help="modelspec.license")
    metadata_tags: str = setting("", label="Metadata tags", tab=META, help="modelspec.tags, comma separated.")
