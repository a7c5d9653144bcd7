"""Settings of the Parameters tab (kohya_ss's "Basic" parameters)."""
from __future__ import annotations

from pydantic import BaseModel

from trainer.lora_types import ALL_TYPES, CONV_TYPES, LYCORIS_PRESETS, types_using
from trainer.optim.table import DROPDOWN_NAMES

from .field import setting

TAB = "Parameters"
BASIC, LR, NET, LYCO, BLOCKS, RES, SDXL = ("Basic", "Learning rate and optimizer", "Network", "LyCORIS",
                                           "Block weights", "Resolution and buckets", "SDXL")

LORA_TYPES = ALL_TYPES  # the one table of LoRA types: trainer.lora_types
OPTIMIZERS = DROPDOWN_NAMES  # the one optimizer table: trainer.optim.table
LR_SCHEDULERS = (
    "adafactor", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
    "polynomial", "piecewise_constant", "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay",
)


LOCON_TYPES = CONV_TYPES  # the types with a conv rank (kohya_ss's "convolution row"): trainer.lora_types
ONLY_LOCON = {"LoRA_type": LOCON_TYPES}
# kohya_ss hides the rank/alpha row for the types that have no rank
RANKED_TYPES = tuple(name for name in ALL_TYPES if name not in ("LyCORIS/iA3", "LyCORIS/Native Fine-Tuning"))


# kohya_ss's Weights/Blocks/Conv fields: the types it passes them to (trainer.network_spec.BLOCK_TYPES)
ONLY_BLOCK_TYPES = {"LoRA_type": ("Standard", "Kohya LoCon", "LoRA-FA", "Kohya DyLoRA")}
_BLOCK_LIST = ("25 comma-separated numbers for SD 1.x/2.x (12 down, 1 mid, 12 up), 23 for SDXL "
               "(time embedding, 9 input, 3 middle, 9 output, out).")


def _lycoris(option: str) -> dict:
    """Shown for the LyCORIS types whose network_args carry ``option``, as in kohya_ss."""
    return {"LoRA_type": types_using(option)}
ONLY_SDXL = {"sdxl": (True,)}  # shown when kohya's SDXL checkbox (the setting field `sdxl`) is ticked


class ParameterSettings(BaseModel):
    # --- Basic -------------------------------------------------------------
    LoRA_type: str = setting(
        "Standard", label="LoRA type", tab=TAB, section=BASIC, choices=LORA_TYPES,
        help="Standard LoRA trains attention and projection layers; LoCon also trains the ResNet convolutions. "
             "LyCORIS types (LoHa, LoKr, iA3, OFT...) train through the lycoris-lora package, as in kohya_ss.",
    )
    network_weights: str = setting(
        "", label="Network weights", tab=TAB, section=BASIC, widget="file",
        help="Optional. An existing LoRA .safetensors to continue training from.",
    )
    dim_from_weights: bool = setting(
        False, label="DIM from weights", tab=TAB, section=BASIC,
        help="Take the network rank from the Network weights file.",
    )
    train_batch_size: int = setting(1, label="Train batch size", tab=TAB, section=BASIC, ge=1, le=64, step=1, widget="slider", ss_key="ss_batch_size_per_device")
    epoch: int = setting(1, label="Epoch", tab=TAB, section=BASIC, ge=1, help="How many times the whole dataset (with repeats) is seen.")
    max_train_epochs: int = setting(
        0, label="Max train epoch", tab=TAB, section=BASIC, ge=0,
        help="0 = use Epoch. When set, overrides Epoch and Max train steps.",
    )
    max_train_steps: int = setting(
        0, label="Max train steps", tab=TAB, section=BASIC, ge=0,
        help="0 = computed from images x repeats x epochs / batch (shown in the step plan). "
        "A number here caps the run at that many steps.",
    )
    save_every_n_epochs: int = setting(1, label="Save every N epochs", tab=TAB, section=BASIC, ge=0)
    caption_extension: str = setting(
        ".txt", label="Caption file extension", tab=TAB, section=BASIC,
        choices=("", ".cap", ".caption", ".txt"), allow_custom=True,
        help="Extension of the caption file next to each image. Images without one use their folder's name.",
    )
    mixed_precision: str = setting(
        "fp16", label="Mixed precision", tab=TAB, section=BASIC, choices=("no", "fp16", "bf16"),
        help="fp16 or bf16 on NVIDIA GPUs (bf16 on RTX 30xx and newer). On a CPU, bf16 runs where the CPU has "
             "bf16 instructions (recent Xeons, AMD Zen 4); otherwise training runs in fp32.",
    )
    num_cpu_threads_per_process: int = setting(
        2, label="Number of CPU threads per core", tab=TAB, section=BASIC, ge=1, le=128, step=1, widget="slider",
    )
    seed: int = setting(0, label="Seed", tab=TAB, section=BASIC, ge=0, help="0 = random. The same seed and settings repeat a run.", ss_key="ss_seed")
    cache_latents: bool = setting(
        True, label="Cache latents", tab=TAB, section=BASIC,
        help="Encode each image once, when training first uses it (in the first epoch), and reuse its latents after that: "
             "training starts at once, later steps are faster and the VAE leaves VRAM after epoch 1. "
             "Not with color augmentation or random crop.",
    )
    cache_latents_to_disk: bool = setting(
        False, label="Cache latents to disk", tab=TAB, section=BASIC,
        help="Keep the cache next to the images so the next run starts faster.",
    )
    # --- Learning rate and optimizer ---------------------------------------
    learning_rate: float = setting(0.0001, label="Learning rate", tab=TAB, section=LR, ge=0, le=10, ss_key="ss_learning_rate")
    unet_lr: float = setting(0.0001, label="Unet learning rate", tab=TAB, section=LR, ge=0, le=10, help="0 = do not train the UNet.")
    text_encoder_lr: float = setting(
        0.0001, label="Text Encoder learning rate", tab=TAB, section=LR, ge=0, le=10,
        help="0 = UNet-only LoRA: the text encoder is not trained and has no keys in the file.",
    )
    loraplus_lr_ratio: float = setting(
        0, label="LoRA+ learning rate ratio", tab=TAB, section=LR, ge=0, le=128,
        help="LoRA+: the lora_up weights learn at this many times the learning rate (start with 16). 0 = off.",
    )
    loraplus_unet_lr_ratio: float = setting(0, label="LoRA+ Unet learning rate ratio", tab=TAB, section=LR, ge=0, le=128,
                                            help="Overrides the ratio for the UNet. 0 = the ratio above.")
    loraplus_text_encoder_lr_ratio: float = setting(
        0, label="LoRA+ Text Encoder learning rate ratio", tab=TAB, section=LR, ge=0, le=128,
        help="Overrides the ratio for the text encoder(s). 0 = the ratio above.",
    )
    lr_scheduler: str = setting("cosine", label="LR Scheduler", tab=TAB, section=LR, choices=LR_SCHEDULERS, ss_key="ss_lr_scheduler")
    lr_scheduler_type: str = setting(
        "", label="LR Scheduler type", tab=TAB, section=LR, choices=("", "CosineAnnealingLR"), allow_custom=True,
        help="Optional. A torch scheduler class name that replaces LR Scheduler.",
    )
    lr_scheduler_args: str = setting(
        "", label="LR scheduler extra arguments", tab=TAB, section=LR, help="Space-separated key=value pairs, e.g. T_max=100.",
    )
    lr_warmup: int = setting(10, label="LR warmup (% of total steps)", tab=TAB, section=LR, ge=0, le=100, step=1, widget="slider")
    lr_warmup_steps: int = setting(0, label="LR warmup steps (override)", tab=TAB, section=LR, ge=0, help="> 0 overrides the warmup %.")
    lr_scheduler_num_cycles: int = setting(1, label="LR # cycles", tab=TAB, section=LR, ge=1, help="For cosine_with_restarts.")
    lr_scheduler_power: float = setting(1.0, label="LR power", tab=TAB, section=LR, ge=0, help="For polynomial.")
    optimizer: str = setting(
        "AdamW8bit", label="Optimizer", tab=TAB, section=LR, choices=OPTIMIZERS, allow_custom=True,
        help="AdamW8bit saves VRAM. Prodigy and DAdapt* find their own learning rate (set it to 1).",
    )
    optimizer_args: str = setting(
        "", label="Optimizer extra arguments", tab=TAB, section=LR,
        help="Space-separated key=value pairs, e.g. scale_parameter=False relative_step=False warmup_init=False",
    )
    max_grad_norm: float = setting(1.0, label="Max grad norm", tab=TAB, section=LR, ge=0, help="0 = no gradient clipping.", ss_key="ss_max_grad_norm")
    # --- Network -----------------------------------------------------------
    network_dim: int = setting(
        8, label="Network Rank (Dimension)", tab=TAB, section=NET, ge=1, le=100000, step=1, widget="number",
        help="LoKr: 100000 (or any rank at least half the layer's size) keeps the second factor a full matrix.",
        ss_key="ss_network_dim", visible_when={"LoRA_type": RANKED_TYPES},
    )
    network_alpha: float = setting(
        1, label="Network Alpha", tab=TAB, section=NET, ge=0, le=100000, step=0.00001, widget="number",
        help="Scales the LoRA by alpha / rank. Usually at most the rank.", ss_key="ss_network_alpha",
        visible_when={"LoRA_type": RANKED_TYPES},
    )
    conv_dim: int = setting(1, label="Convolution Rank (Dimension)", tab=TAB, section=NET, ge=0, le=100000, step=1, widget="number", help="LoCon-style types only.", visible_when=ONLY_LOCON)
    conv_alpha: float = setting(1, label="Convolution Alpha", tab=TAB, section=NET, ge=0, le=100000, step=0.1, widget="number", help="LoCon-style types only.", visible_when=ONLY_LOCON)
    scale_weight_norms: float = setting(0, label="Scale weight norms", tab=TAB, section=NET, ge=0, le=10, step=0.01, widget="slider", help="0 = off; 1 recommended.", ss_key="ss_scale_weight_norms", ss_none_if_off=True)
    network_dropout: float = setting(0, label="Network dropout", tab=TAB, section=NET, ge=0, le=1, step=0.01, widget="slider", ss_key="ss_network_dropout", ss_none_if_off=True)
    rank_dropout: float = setting(0, label="Rank dropout", tab=TAB, section=NET, ge=0, le=1, step=0.01, widget="slider")
    module_dropout: float = setting(0, label="Module dropout", tab=TAB, section=NET, ge=0, le=1, step=0.01, widget="slider")
    # --- LyCORIS (kohya_ss's LyCORIS accordion; passed to lycoris.kohya as network_args) ----------
    LyCORIS_preset: str = setting(
        "full", label="LyCORIS Preset", tab=TAB, section=LYCO, choices=LYCORIS_PRESETS, allow_custom=True,
        help="Which layers LyCORIS trains: full = attention, MLP and ResNet layers (conv too). Or the path of a LyCORIS "
             "preset .toml file.", visible_when=_lycoris("LyCORIS_preset"),
    )
    factor: int = setting(-1, label="LoKr factor", tab=TAB, section=LYCO, ge=-1, le=64, step=1, widget="slider",
                          help="-1 = the most balanced factorisation.", visible_when=_lycoris("factor"))
    bypass_mode: bool = setting(False, label="Bypass mode", tab=TAB, section=LYCO, visible_when=_lycoris("bypass_mode"),
                                help="Add the update to the layer's output instead of rebuilding its weight.")
    dora_wd: bool = setting(False, label="DoRA Weight Decompose", tab=TAB, section=LYCO, visible_when=_lycoris("dora_wd"),
                            help="DoRA: train the weight's direction and magnitude apart (adds dora_scale to the file).")
    use_cp: bool = setting(False, label="Use CP decomposition", tab=TAB, section=LYCO, visible_when=_lycoris("use_cp"))
    use_tucker: bool = setting(False, label="Use Tucker decomposition", tab=TAB, section=LYCO,
                               visible_when=_lycoris("use_tucker"), help="For 3x3 convs: a smaller core tensor.")
    use_scalar: bool = setting(False, label="Use Scalar", tab=TAB, section=LYCO, visible_when=_lycoris("use_scalar"),
                               help="Train an extra scalar per module.")
    rank_dropout_scale: bool = setting(False, label="Rank Dropout Scale", tab=TAB, section=LYCO,
                                       visible_when=_lycoris("rank_dropout_scale"))
    constrain: float = setting(0.0, label="Constrain OFT", tab=TAB, section=LYCO, ge=0,
                               visible_when=_lycoris("constrain"))
    rescaled: bool = setting(False, label="Rescaled OFT", tab=TAB, section=LYCO, visible_when=_lycoris("rescaled"))
    train_norm: bool = setting(False, label="Train Norm", tab=TAB, section=LYCO, visible_when=_lycoris("train_norm"),
                               help="Also train the normalisation layers.")
    decompose_both: bool = setting(False, label="LoKr decompose both", tab=TAB, section=LYCO,
                                   visible_when=_lycoris("decompose_both"))
    train_on_input: bool = setting(True, label="iA3 train on input", tab=TAB, section=LYCO,
                                   visible_when=_lycoris("train_on_input"))
    unit: int = setting(1, label="DyLoRA Unit / Block size", tab=TAB, section=LYCO, ge=1, le=64, step=1, widget="slider",
                        visible_when={"LoRA_type": ("Kohya DyLoRA", "LyCORIS/DyLoRA")})
    # --- Block weights (kohya_ss's Weights / Blocks / Conv tabs; sd-scripts' networks.lora) -------
    down_lr_weight: str = setting(
        "", label="Down LR weights", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
        help="Learning-rate weight of each down block of the UNet, e.g. 0,0,0,0,0,0,1,1,1,1,1,1, or a curve: "
             "cosine, sine, linear, reverse_linear, zeros (add +0.1 to raise it). A block at 0 gets no LoRA.",
    )
    mid_lr_weight: str = setting("", label="Mid LR weights", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
                                 help="Learning-rate weight of the mid block(s), e.g. 0.5 (SDXL: 3 numbers).")
    up_lr_weight: str = setting("", label="Up LR weights", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
                                help="As Down LR weights, for the up blocks (deeper to shallower).")
    block_lr_zero_threshold: str = setting(
        "", label="Blocks LR zero threshold", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
        help="A block whose weight is not more than this gets no LoRA module. Empty = 0.",
    )
    block_dims: str = setting("", label="Block dims", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
                              help="The rank of each block: " + _BLOCK_LIST)
    block_alphas: str = setting("", label="Block alphas", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
                                help="The alpha of each block (as Block dims). Empty = Network Alpha.")
    conv_block_dims: str = setting(
        "", label="Conv dims", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
        help="Extend LoRA to the 3x3 convolutions with this rank per block: " + _BLOCK_LIST,
    )
    conv_block_alphas: str = setting("", label="Conv alphas", tab=TAB, section=BLOCKS, visible_when=ONLY_BLOCK_TYPES,
                                     help="The conv alpha of each block. Empty = Convolution Alpha.")
    # --- Resolution and buckets --------------------------------------------
    max_resolution: str = setting(
        "512,512", label="Max resolution", tab=TAB, section=RES, help="Width,height of the training area, e.g. 512,512 or 1024,1024.",
    )
    stop_text_encoder_training: int = setting(
        0, label="Stop TE (% of total steps)", tab=TAB, section=RES, ge=-1, le=100,
        help="Not supported for LoRA (as in kohya_ss); kept so configs round-trip.",
        unused="not supported for LoRA training (as in kohya_ss); to train the UNet only, set Text Encoder learning rate to 0",
    )
    enable_bucket: bool = setting(True, label="Enable buckets", tab=TAB, section=RES, help="Train images of different aspect ratios without cropping them square.", ss_key="ss_enable_bucket")
    min_bucket_reso: int = setting(256, label="Minimum bucket resolution", tab=TAB, section=RES, ge=64, le=4096, step=64, widget="slider", ss_key="ss_min_bucket_reso")
    max_bucket_reso: int = setting(2048, label="Maximum bucket resolution", tab=TAB, section=RES, ge=64, le=4096, step=64, widget="slider", ss_key="ss_max_bucket_reso")
    # --- SDXL ----------------------------------------------------------------
    sdxl_cache_text_encoder_outputs: bool = setting(
        False, label="Cache text encoder outputs", tab=TAB, section=SDXL,
        help="SDXL: encode captions once; the text encoders are then not trained and leave GPU memory.",
        visible_when=ONLY_SDXL,
    )
    sdxl_no_half_vae: bool = setting(
        False, label="No half VAE", tab=TAB, section=SDXL, help="SDXL: keep the VAE in fp32 (the fp16 SDXL VAE overflows to NaN).",
        visible_when=ONLY_SDXL,
    )
