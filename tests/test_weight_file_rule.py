"""One rule for which weights files of a diffusers component folder are loaded: the model check, the size
estimate, detection and the loader read the same files, and a file the loader skips is neither checked
nor counted."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from test_preflight_support import big_cpu, problems, settings
from trainer.checkpoints.detect import detect
from trainer.checkpoints.weight_files import component_weight_files
from trainer.families import SPECS
from trainer.models.weights import WeightsError, read_state_dict, weight_files
from trainer.preflight import check
from trainer.preflight import device as device_module
from trainer.preflight.model import weights_problems
from trainer.preflight.model_size import model_size

KEY = "pretrained_model_name_or_path"
UNET = "diffusion_pytorch_model"
SHARDS = (f"{UNET}-00001-of-00002.safetensors", f"{UNET}-00002-of-00002.safetensors")
FP16_SHARDS = (f"{UNET}-00001-of-00002.fp16.safetensors", f"{UNET}-00002-of-00002.fp16.safetensors")

# (case, the files in unet/, the ones loaded); every file holds its own tensors, so what is read shows.
CASES = [
    ("safetensors beside bin", [f"{UNET}.safetensors", f"{UNET}.bin"], [f"{UNET}.safetensors"]),
    ("sharded with an index", [*SHARDS, f"{UNET}.bin"], list(SHARDS)),
    ("fp16 variant beside the plain file", [f"{UNET}.safetensors", f"{UNET}.fp16.safetensors"],
     [f"{UNET}.safetensors"]),
    ("fp16 variant only", [f"{UNET}.fp16.safetensors", f"{UNET}.non_ema.safetensors"], [f"{UNET}.fp16.safetensors"]),
    ("sharded fp16 variant", [*FP16_SHARDS, f"{UNET}.fp16.bin"], list(FP16_SHARDS)),
    ("stray non-EMA copy", [f"{UNET}.safetensors", f"{UNET}.non_ema.safetensors"], [f"{UNET}.safetensors"]),
    ("fp16 safetensors beside a plain bin", [f"{UNET}.fp16.safetensors", f"{UNET}.bin"], [f"{UNET}.fp16.safetensors"]),
    ("only bin", [f"{UNET}.bin"], [f"{UNET}.bin"]),
    ("transformers names", ["model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
]


@pytest.fixture(autouse=True)
def fixed_device(monkeypatch):
    monkeypatch.setattr(device_module, "probe_device", big_cpu)


def _tensors(name: str, number: int) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": torch.ones(number + 2, 3)}  # a size of its own: a count shows which files were read


def _write(folder, names):
    """Each file with its own tensors; shards get the index diffusers writes for them."""
    folder.mkdir(parents=True)
    params = {}
    for number, name in enumerate(names):
        tensors = _tensors(name, number)
        params[name] = sum(t.numel() for t in tensors.values())
        if name.endswith(".bin"):
            torch.save(tensors, folder / name)
        else:
            save_file(tensors, folder / name)
    indexes = {f"{UNET}.safetensors.index.json": SHARDS, f"{UNET}.safetensors.index.fp16.json": FP16_SHARDS}
    for index, shards in indexes.items():
        if set(shards) <= set(names):
            weight_map = {key: shard for shard in shards for key in _tensors(shard, names.index(shard))}
            (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params


def _cut(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("case, names, loaded", CASES, ids=[case[0] for case in CASES])
def test_the_check_the_size_estimate_and_the_loader_agree_on_the_files(tmp_path, case, names, loaded):
    pipeline = tmp_path / "pipeline"
    unet = pipeline / "unet"
    params = _write(unet, names)
    assert component_weight_files(unet) == [unet / name for name in loaded]
    assert weight_files(unet) == component_weight_files(unet)
    # The loader reads exactly these files' tensors.
    expected = {key for name in loaded for key in _tensors(name, names.index(name))}
    assert set(read_state_dict(weight_files(unet))) == expected
    # The size estimate counts exactly them (a .bin is not opened: the family's nominal size applies).
    size = model_size(str(pipeline), SPECS["sd1"])
    safetensors = [name for name in loaded if name.endswith(".safetensors")]
    assert size.unet == (sum(params[name] for name in safetensors) or None), size.note
    # The check ignores damage to the files the loader skips, and names damage to those it reads.
    for skipped in set(names) - set(loaded):
        _cut(unet / skipped)
    assert weights_problems(pipeline, deep=True) == []
    _cut(unet / loaded[-1])
    [(file, problem)] = weights_problems(pipeline, deep=True)
    assert file == unet / loaded[-1] and ("is truncated" in problem or "cannot be read" in problem), problem


def test_a_folder_without_loadable_weights(tmp_path):
    unet = tmp_path / "unet"
    _write(unet, [f"{UNET}.non_ema.safetensors", "weights.ckpt"])  # files, but none the loader reads
    assert component_weight_files(unet) == [] and component_weight_files(tmp_path / "missing") == []
    with pytest.raises(WeightsError, match="has no weights"):
        weight_files(unet)


def test_a_missing_shard_or_broken_index_is_named_by_the_check_and_the_loader(tmp_path):
    unet = tmp_path / "pipeline" / "unet"
    _write(unet, list(SHARDS))
    (unet / SHARDS[1]).unlink()
    assert weights_problems(tmp_path / "pipeline", deep=False) == [(unet / SHARDS[1], "does not exist")]
    with pytest.raises(WeightsError, match=f"do not exist \\({SHARDS[1]}\\)"):
        weight_files(unet)
    index = unet / f"{UNET}.safetensors.index.json"
    index.write_text("{not json")
    [(file, problem)] = weights_problems(tmp_path / "pipeline", deep=False)
    assert file == index and problem.startswith("is not a readable index of weight shards"), problem
    with pytest.raises(WeightsError, match="is not a readable index"):
        weight_files(unet)
    assert model_size(str(tmp_path / "pipeline"), SPECS["sd1"]).unet is None  # nominal size, not a crash


def test_a_real_pipeline_with_decoys_and_a_sharded_unet(tmp_path, tiny_sd1_dir):
    """The tiny SD1 folder as hub snapshots come: damaged files the loader never reads pass the check, the
    estimate counts the same parameters, and a sharded UNet loads; a missing shard is named before the run."""
    from trainer.checkpoints import load_pipeline_components
    from trainer.checkpoints.integrity import read_safetensors_header

    folder = shutil.copytree(tiny_sd1_dir, tmp_path / "model")
    whole = folder / "unet" / f"{UNET}.safetensors"
    before = model_size(str(tiny_sd1_dir), SPECS["sd1"])
    for decoy in (f"{UNET}.fp16.safetensors", f"{UNET}.non_ema.safetensors", f"{UNET}.bin"):
        (folder / "unet" / decoy).write_bytes(whole.read_bytes()[:1000])
    (folder / "safety_checker").mkdir()  # a component Nekoya never loads
    (folder / "safety_checker" / "config.json").write_text("{}")
    (folder / "safety_checker" / "model.safetensors").write_bytes(b"\0" * 3)
    assert check(settings(tmp_path, folder)).ok
    assert model_size(str(folder), SPECS["sd1"]).unet == before.unet

    state = read_state_dict([whole])
    keys = sorted(state)
    halves = dict(zip(SHARDS, (keys[: len(keys) // 2], keys[len(keys) // 2:])))
    for shard, names in halves.items():
        save_file({k: state[k].contiguous() for k in names}, folder / "unet" / shard)
    (folder / "unet" / f"{UNET}.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, names in halves.items() for k in names}}))
    whole.unlink()
    assert detect(folder).ok and check(settings(tmp_path, folder)).ok
    headers = [read_safetensors_header(folder / "unet" / shard) for shard in SHARDS]
    counted = sum(math.prod(shape) for header in headers for shape in header.shapes.values())
    assert counted == before.unet
    unet = load_pipeline_components(folder).unet
    torch.testing.assert_close(unet.state_dict()["conv_in.weight"], state["conv_in.weight"])

    (folder / "unet" / SHARDS[1]).unlink()
    [error] = problems(check(settings(tmp_path, folder)), "error", KEY)
    assert error.message == f"{SHARDS[1]} does not exist" and error.file == str(folder / "unet" / SHARDS[1])


def test_one_check_reads_each_header_once(tmp_path, tiny_sd1_file):
    """Detection, the truncation check, the size estimate and the LoRA check share one read of each header."""
    from trainer.checkpoints import integrity

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(4, 32), "lora_unet_x.lora_up.weight": torch.ones(32, 4)},
              lora)
    model = shutil.copy(tiny_sd1_file, tmp_path / "model.safetensors")  # not in the cache of earlier tests
    integrity._read_header.cache_clear()
    report = check(settings(tmp_path, model, network_weights=str(lora), network_dim=4))
    assert report.ok, report.format()
    reads = integrity._read_header.cache_info()
    assert reads.misses == 2 and reads.hits >= 3, reads  # the model (asked for 3 times) and the LoRA (2), read once
