"""Tests for trainer.checkpoints: detection, single-file loading, pickles, shipped configs."""
from __future__ import annotations

import json
import os
import pickle

import pytest

FAMILY_FIXTURES = {"sd1": ("tiny_sd1_dir", "tiny_sd1_file"), "sd2": ("tiny_sd2_dir", "tiny_sd2_file"),
                   "sdxl": ("tiny_sdxl_dir", "tiny_sdxl_file")}
TEXT_ENCODERS = {"sd1": 1, "sd2": 1, "sdxl": 2}


def _reference(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _assert_same_weights(a, b):
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def _unet_output(unet, family, cross_dim):
    import torch

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, cross_dim, generator=gen)
    extra = {}
    if family == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        out = unet(sample, 500, encoder_hidden_states=context, **extra)
    return getattr(out, "sample", out)  # Nekoya's UNet returns the tensor, diffusers' an output object


# ---- single file round trip ------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_bit_identical(request, family):
    import torch
    from trainer.checkpoints import load_pipeline_components

    folder, file = (request.getfixturevalue(name) for name in FAMILY_FIXTURES[family])
    loaded = load_pipeline_components(file)
    ref = _reference(folder)
    assert loaded.family == family and loaded.info.format == "safetensors"
    _assert_same_weights(loaded.unet, ref.unet)
    _assert_same_weights(loaded.vae, ref.vae)
    ref_encoders = [ref.text_encoder] + ([ref.text_encoder_2] if family == "sdxl" else [])
    assert len(loaded.text_encoders) == len(loaded.tokenizers) == TEXT_ENCODERS[family]
    for mine, theirs in zip(loaded.text_encoders, ref_encoders):
        _assert_same_weights(mine, theirs)
    # The inferred architecture (heads, projections, depths) computes what the original does. The weights
    # above are bit-identical; the outputs agree to float rounding only, because the lean UNet's 2-D-row
    # matmuls pick other CPU kernels than diffusers' 3-D ones on some CPUs (1e-6 apart on AVX512 EPYC).
    cross = ref.unet.config.cross_attention_dim
    torch.testing.assert_close(_unet_output(loaded.unet, family, cross), _unet_output(ref.unet, family, cross),
                               atol=1e-5, rtol=1e-5)
    ids = loaded.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.tolist() == ref.tokenizer("a photo of sks dog", padding="max_length", max_length=77,
                                         return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids)[0], ref.text_encoder(ids)[0])


def test_diffusers_folder_loads(tiny_sdxl_dir):
    import torch
    from trainer.checkpoints import load_pipeline_components

    loaded = load_pipeline_components(tiny_sdxl_dir, family_hint="sdxl", dtype=torch.bfloat16)
    assert loaded.info.format == "diffusers" and loaded.config_dir == tiny_sdxl_dir
    assert loaded.unet.dtype == torch.bfloat16 and len(loaded.text_encoders) == 2
    assert loaded.tokenizers[1].pad_token == "!" and loaded.tokenizers[0].pad_token == "<|endoftext|>"
    assert loaded.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


def test_exported_file_is_what_diffusers_reads(tiny_sd2_dir, tiny_sd2_file):
    """Cross-check the exporter against diffusers' own single-file converter."""
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_single_file(str(tiny_sd2_file), config=str(tiny_sd2_dir), local_files_only=True)
    ref = _reference(tiny_sd2_dir)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(theirs, name), getattr(ref, name))


def test_sd2_file_has_openclip_layout(tiny_sd2_file):
    from safetensors import safe_open

    with safe_open(str(tiny_sd2_file), "pt") as f:
        keys = set(f.keys())
        in_proj = f.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").get_shape()
    assert in_proj == [96, 32]  # q, k, v merged
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in keys  # the layer diffusers drops
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_v_parameterization_and_scheduler(tiny_sd2v_dir, tmp_path):
    from trainer.checkpoints import detect, load_pipeline_components
    from trainer.devtools.synthetic import save_single_file

    assert detect(tiny_sd2v_dir).v_parameterization is True
    file = save_single_file(tiny_sd2v_dir, tmp_path / "v.safetensors")
    assert detect(file).v_parameterization is None  # identical tensors to an epsilon SD2 model
    as_v = load_pipeline_components(file, v_parameterization=True)
    assert as_v.v_parameterization and as_v.scheduler_config["prediction_type"] == "v_prediction"
    assert load_pipeline_components(file).scheduler_config["prediction_type"] == "epsilon"


# ---- detection -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family_both_forms(request, family):
    from trainer.checkpoints import detect

    folder, file = (request.getfixturevalue(name) for name in FAMILY_FIXTURES[family])
    for path, fmt in ((folder, "diffusers"), (file, "safetensors")):
        info = detect(path)
        assert (info.family, info.format, info.ok, info.kind) == (family, fmt, True, "checkpoint")


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_detect_rejects_lora_random_and_vae(tmp_path, tiny_sd1_file):
    import torch
    from safetensors.torch import load_file
    from trainer.checkpoints import CheckpointError, detect

    lora = _save({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, tmp_path / "lora.safetensors")
    info = detect(lora)
    assert info.family is None and info.kind == "lora" and "LoRA" in info.problems[0]
    with pytest.raises(CheckpointError, match="LoRA"):
        info.require_usable()

    random = _save({f"layer{i}.weight": torch.randn(8, 8) for i in range(5)}, tmp_path / "random.safetensors")
    info = detect(random)
    assert info.family is None and info.kind == "unknown" and "model.diffusion_model" in info.problems[0]

    full = load_file(tiny_sd1_file)
    vae_only = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    info = detect(_save(vae_only, tmp_path / "vae.safetensors"))
    assert info.kind == "vae" and "VAE" in info.problems[0]

    unet_only = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    info = detect(_save(unet_only, tmp_path / "unet_only.safetensors"))
    assert info.family == "sd1" and not info.ok
    assert any("VAE" in p for p in info.problems) and any("text encoder" in p for p in info.problems)


def test_detect_bad_paths(tmp_path, tiny_sd1_dir):
    from trainer.checkpoints import CheckpointError, detect

    with pytest.raises(CheckpointError, match="does not exist"):
        detect(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        detect(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        detect(tmp_path / "broken.safetensors")
    assert "model_index.json" in detect(tiny_sd1_dir / "unet").problems[0]


def test_family_hint_mismatch_and_hub_ids(tiny_sd1_file):
    from trainer.checkpoints import CheckpointError, load_pipeline_components

    with pytest.raises(CheckpointError, match="SD1 model, but the settings say SDXL"):
        load_pipeline_components(tiny_sd1_file, family_hint="sdxl")
    with pytest.raises(CheckpointError, match="never downloads"):
        load_pipeline_components("nekoya-test/definitely-not-cached-model")


# ---- pickles -----------------------------------------------------------------------------

def test_ckpt_loads_with_weights_only(tiny_sd1_dir, tmp_path):
    from trainer.checkpoints import detect, load_pipeline_components
    from trainer.devtools.synthetic import save_single_file

    file = save_single_file(tiny_sd1_dir, tmp_path / "tiny.ckpt")
    info = detect(file)
    assert (info.family, info.format) == ("sd1", "ckpt")
    loaded = load_pipeline_components(file)
    _assert_same_weights(loaded.unet, _reference(tiny_sd1_dir).unet)


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for any hostile payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_hostile_pickle_is_refused_and_creates_nothing(tmp_path, writer):
    import torch
    from trainer.checkpoints import UnsafeCheckpointError, detect, load_pipeline_components

    marker = tmp_path / "pwned.txt"
    payload = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)},
               "hook": _CreatesFile(str(marker))}
    path = tmp_path / "hostile.ckpt"
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"\.safetensors"):
        detect(path)
    with pytest.raises(UnsafeCheckpointError):
        load_pipeline_components(path)
    assert not marker.exists()
    # The payload is real: unpickling it without weights_only would create the file.
    pickle.loads(pickle.dumps(_CreatesFile(str(marker))))
    assert marker.exists()


def _cut(source, target, keep: float = 0.6):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _pickled_unet_folder(model_dir, tmp_path):
    """The model folder with its UNet weights replaced by a pickle that weights_only refuses."""
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "pickled")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_CreatesFile(str(tmp_path / "pwned"))))
    return folder, folder / "unet" / "diffusion_pytorch_model.bin"


def test_loading_a_damaged_model_names_the_file_in_our_words(tmp_path, tiny_sd1_file, tiny_sd1_dir):
    """What a file changed after the check meets at load time: CheckpointError naming the file, no library text."""
    from trainer.checkpoints import CheckpointError, load_pipeline_components
    from trainer.checkpoints.load import load_vae

    cut = _cut(tiny_sd1_file, tmp_path / "cut.safetensors")
    folder, pickled = _pickled_unet_folder(tiny_sd1_dir, tmp_path)
    cut_vae = _cut(tiny_sd1_dir / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors")
    for load, named in [(lambda: load_pipeline_components(cut), f"{cut} is truncated"),
                        (lambda: load_pipeline_components(folder), f"{pickled} cannot be loaded safely"),
                        (lambda: load_vae(cut_vae, tiny_sd1_dir, None), f"{cut_vae} is truncated")]:
        with pytest.raises(CheckpointError) as raised:
            load()
        message = str(raised.value)
        assert named in message, message
        assert "weights_only" not in message and "deserializing" not in message
    assert not (tmp_path / "pwned").exists()


def test_truncated_network_weights_fail_at_load_naming_the_file_and_field(tmp_path):
    import torch
    from safetensors.torch import save_file
    from trainer.network.network import NetworkConfigError
    from trainer.network.weights import read_lora_file

    whole = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(4, 32), "lora_unet_x.lora_up.weight": torch.ones(32, 4)},
              str(whole))
    cut = _cut(whole, tmp_path / "cut.safetensors", 0.8)
    with pytest.raises(NetworkConfigError) as raised:
        read_lora_file(str(cut))
    assert raised.value.field == "network_weights"
    assert str(raised.value).startswith(f"Network weights: {cut} is truncated")
    assert set(read_lora_file(str(whole))) == {"lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"}


# ---- shipped configs -------------------------------------------------------------------------

# Parameter counts of the official models (diffusers/transformers classes).
OFFICIAL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21_base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl_base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840},
}
SHIPPED_FAMILY = {"sd15": "sd1", "sd21_base": "sd2", "sd21": "sd2", "sdxl_base": "sdxl"}


def _meta_components(config_dir):
    """Every model of a config folder, built on the meta device (no weights allocated)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    index = json.loads((config_dir / "model_index.json").read_text())
    models = {}
    for name in OFFICIAL_PARAMETERS["sdxl_base"]:
        if name not in index:
            continue
        library, class_name = index[name]
        with init_empty_weights(include_buffers=True):
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                models[name] = cls.from_config(cls.load_config(config_dir / name))
            else:
                config = transformers.CLIPTextConfig.from_pretrained(config_dir / name)
                models[name] = getattr(transformers, class_name)(config)
    return models


@pytest.fixture(scope="module")
def shipped_meta_models():
    from trainer.checkpoints import shipped_config_dir

    return {name: _meta_components(shipped_config_dir(name)) for name in OFFICIAL_PARAMETERS}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMETERS))
def test_shipped_configs_have_official_sizes(name, shipped_meta_models):
    models = shipped_meta_models[name]
    counts = {component: sum(p.numel() for p in m.parameters()) for component, m in models.items()}
    assert counts == OFFICIAL_PARAMETERS[name]
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMETERS))
def test_standard_shapes_map_to_shipped_config(name, shipped_meta_models):
    """A file with official shapes is recognised as such, and diffusers agrees on its layout."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from trainer.checkpoints.detect import detect_from_keys
    from trainer.checkpoints.infer import BASE_CONFIGS
    from trainer.checkpoints.shapes import infer_components, same_config
    from trainer.checkpoints.shipped import read_component_config, shipped_config_source
    from trainer.devtools.single_file import single_file_state_dict

    family = SHIPPED_FAMILY[name]
    weights = {component: m.state_dict() for component, m in shipped_meta_models[name].items()}
    ldm = single_file_state_dict(weights, family)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    info = detect_from_keys(None, "safetensors", shapes)
    assert info.family == family and info.ok
    assert infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    assert name in BASE_CONFIGS[family].values()
    inferred = infer_components(shapes, family)
    assert set(inferred) == set(weights)
    for component, values in inferred.items():
        assert same_config(read_component_config(shipped_config_source(name), component), values), component


def test_sd15_layout_matches_diffusers_converter(shipped_meta_models):
    """diffusers' LDM->diffusers UNet/VAE conversion of our SD1.5 layout gives back every key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from trainer.devtools.single_file import single_file_state_dict

    models = shipped_meta_models["sd15"]
    ldm = single_file_state_dict({c: m.state_dict() for c, m in models.items()}, "sd1")
    unet = convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config))
    vae = convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config))
    assert set(unet) == set(models["unet"].state_dict())
    assert set(vae) == set(models["vae"].state_dict())
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # upsampler without attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # upsampler after attention
    assert tuple(ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)


def test_shipped_tokenizers_are_real_clip():
    from transformers import CLIPTokenizer
    from trainer.checkpoints import shipped_config_dir

    sd15 = CLIPTokenizer.from_pretrained(shipped_config_dir("sd15") / "tokenizer")
    assert len(sd15) == 49408 and sd15.model_max_length == 77
    assert sd15("a photo of sks dog, masterpiece").input_ids == [49406, 320, 1125, 539, 48136, 1929, 267, 12066, 49407]
    assert sd15.pad_token_id == 49407
    sd2 = CLIPTokenizer.from_pretrained(shipped_config_dir("sd21") / "tokenizer")
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0
    xl = shipped_config_dir("sdxl_base")
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer_2").pad_token_id == 0
    # Materialised once, in the cache, from the single stored vocabulary.
    assert shipped_config_dir("sd15") == shipped_config_dir("sd15")
    assert os.environ["NEKOYA_CACHE_DIR"] in str(shipped_config_dir("sd15"))


# ---- custom architectures --------------------------------------------------------------

def test_tiny_file_needs_its_tokenizer(tiny_sd1_file, tiny_sd1_dir, tmp_path):
    import shutil

    from trainer.checkpoints import CheckpointError, infer_config_dir, matching_shipped_config

    assert matching_shipped_config(tiny_sd1_file) is None
    folder = infer_config_dir(tiny_sd1_file)  # uses the <file>.tokenizers sidecar
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [32, 64] and unet["cross_attention_dim"] == 32
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["eos_token_id"] == 522

    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny_sd1_file, lonely)
    with pytest.raises(CheckpointError, match="tokenizer_dir"):
        infer_config_dir(lonely)
    assert infer_config_dir(lonely, tokenizer_dir=tiny_sd1_dir) == folder


def test_real_world_variants_old_clip_keys_and_fp16(tiny_sd1_dir, tiny_sd1_file, tmp_path):
    """Early SD1 files lack "text_model." in CLIP keys; many files are stored in fp16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from trainer.checkpoints import load_pipeline_components
    from trainer.devtools.synthetic import save_single_file

    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in load_file(tiny_sd1_file).items()}
    old_file = tmp_path / "old.safetensors"
    save_file(old, str(old_file))
    shutil.copytree(str(tiny_sd1_file) + ".tokenizers", str(old_file) + ".tokenizers")
    ref = _reference(tiny_sd1_dir)
    _assert_same_weights(load_pipeline_components(old_file).text_encoder, ref.text_encoder)

    half = save_single_file(tiny_sd1_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_pipeline_components(half)
    assert loaded.unet.dtype == torch.float32
    expected = ref.unet.conv_in.weight.detach().half().float()
    assert torch.equal(loaded.unet.conv_in.weight, expected)
