"""sd-scripts' dataset config TOML (kohya_ss's dataset_config): datasets and subsets, each with its own folder,
repeats, resolution, batch size, caption rules and augmentations (issue #16)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from trainer.data.dataset import DatasetConfig, TrainingDataset
from trainer.data.dataset_config import DatasetConfigError, load_dataset_config
from trainer.data.plan import plan_steps
from trainer.devtools.images import make_image_folder
from trainer.preflight import check
from trainer.settings.kohya_json import settings_from_dict

TWO_DATASETS = """
[general]
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "{root}/a/x"
  num_repeats = 3
  shuffle_caption = true
  caption_dropout_rate = 1.0

  [[datasets.subsets]]
  image_dir = "{root}/r/z"
  is_reg = true
  class_tokens = "dog"

[[datasets]]
resolution = [96, 64]
flip_aug = true
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "{root}/b/y"
  num_repeats = 2
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset_config")
    make_image_folder(root / "a", {"x": 2}, sizes=[(64, 64)], seed=1)
    make_image_folder(root / "b", {"y": 3}, sizes=[(96, 64)], seed=2)
    make_image_folder(root / "r", {"z": 4}, sizes=[(64, 64)], captions=False, seed=3)
    return root


def _toml(root: Path, text: str = TWO_DATASETS, name: str = "dataset.toml") -> Path:
    path = root / name
    path.write_text(text.replace("{root}", root.as_posix()), encoding="utf-8")
    return path


def _settings(path, **values):
    base = {"dataset_config": str(path), "epoch": 2, "train_batch_size": 4, "bucket_no_upscale": False,
            "caption_extension": ".caption", "shuffle_caption": False, "flip_aug": False, "cache_latents": False,
            "cache_latents_to_disk": False}
    return settings_from_dict({**base, **values}).settings


# --- the file: schema and inheritance ------------------------------------------------------------------------

def test_values_inherit_subset_then_dataset_then_general_then_settings(root):
    toml = load_dataset_config(_settings(_toml(root), max_resolution="96,96", keep_tokens=3, color_aug=True))
    first, second = toml.datasets
    assert (first.resolution, first.batch_size, second.resolution, second.batch_size) == ((64, 64), 2, (96, 64), 4)
    train, reg = first.subsets
    assert (train.num_repeats, train.is_reg, reg.num_repeats, reg.is_reg, reg.class_tokens) == (3, False, 1, True, "dog")
    assert train.captions.shuffle and train.captions.dropout_rate == 1.0 and not reg.captions.shuffle
    assert train.captions.keep_tokens == 1 == reg.captions.keep_tokens  # [general] over the setting (3)
    assert train.caption_extension == ".txt"  # [general] over the setting (.caption)
    assert train.color_aug and not train.flip_aug  # the setting, where no table gives it
    assert second.subsets[0].flip_aug and second.subsets[0].batch_size == 4  # dataset's flip_aug, setting's batch


def test_resolution_falls_back_to_max_resolution(root):
    toml = load_dataset_config(_settings(_toml(root, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "r.toml"),
                                         max_resolution="96,64"))
    assert toml.datasets[0].resolution == (96, 64)
    assert toml.datasets[0].subsets[0].num_repeats == 1  # sd-scripts' default


@pytest.mark.parametrize("text, table, key, words", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeat = 2\n", "datasets[0].subsets[0]", "num_repeat",
     "is not a key sd-scripts knows"),
    ("[[datasets]]\nbatch_size = 'two'\n[[datasets.subsets]]\nimage_dir = 'x'\n", "datasets[0]", "batch_size",
     "must be a whole number"),
    ("[general]\nflip_aug = 'yes'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "general", "flip_aug",
     "must be true or false"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "datasets[0].subsets[0]", "image_dir", "is missing"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n", "datasets[0].subsets[0]", "metadata_file",
     "fine-tuning style subset"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nkeep_tokens = -1\n", "datasets[0].subsets[0]", "keep_tokens",
     "must be 0 or more"),
    ("[general]\nresolution = 512\n", "datasets", None, "no [[datasets]]"),
    ("[[datasets]]\nresolution = 512\n", "datasets[0]", "subsets", "no [[datasets.subsets]]"),
])
def test_errors_name_the_file_the_table_and_the_key(root, text, table, key, words):
    path = _toml(root, text, "bad.toml")
    with pytest.raises(DatasetConfigError) as caught:
        load_dataset_config(_settings(path))
    message = str(caught.value)
    assert message.startswith(f"dataset_config {path}: [{table}]" + (f" {key}:" if key else ":")), message
    assert words in message and caught.value.field == "dataset_config" and caught.value.file == str(path)


def test_a_metadata_file_subset_is_refused_with_what_to_do(root):
    path = _toml(root, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nmetadata_file = 'm.json'\n", "ft.toml")
    with pytest.raises(DatasetConfigError) as caught:
        load_dataset_config(_settings(path))
    assert "metadata_file" in str(caught.value) and "DreamBooth-style" in caught.value.fix


def test_subsets_sd_scripts_ignores_are_left_out_with_a_warning(root):
    text = TWO_DATASETS.replace('num_repeats = 2', 'num_repeats = 2\n\n  [[datasets.subsets]]\n  image_dir = "{root}/b/y"'
                                                   '\n\n  [[datasets.subsets]]\n  image_dir = "{root}/a/x"\n'
                                                   '  num_repeats = 0')
    path = _toml(root, text, "ignored.toml")
    toml = load_dataset_config(_settings(path))
    assert [s.table for s in toml.datasets[1].subsets] == ["datasets[1].subsets[0]"]
    assert toml.ignored == (
        f"dataset_config {path}: [datasets[1].subsets[1]] is ignored: [datasets[1].subsets[0]] already has image_dir "
        f"{root / 'b' / 'y'} (sd-scripts uses the first one too)",
        f"dataset_config {path}: [datasets[1].subsets[2]] is ignored: num_repeats is 0, less than 1 (as sd-scripts "
        "ignores it)")
    plan = plan_steps(_settings(path))
    assert plan.ok and plan.total_steps == 16 and set(toml.ignored) <= set(plan.warnings)
    report = check(_settings(path), deep=False)
    assert {p.message for p in report.warnings if p.field == "dataset_config"} >= set(toml.ignored)


def test_unreadable_and_missing_files(root):
    with pytest.raises(DatasetConfigError, match=r"cannot be read as TOML"):
        load_dataset_config(_settings(_toml(root, "[[datasets]\n", "syntax.toml")))
    with pytest.raises(DatasetConfigError, match=r"dataset_config .*nowhere.toml does not exist"):
        load_dataset_config(_settings(root / "nowhere.toml"))


# --- the step plan ---------------------------------------------------------------------------------------------

def test_two_datasets_with_a_reg_subset_plan_each_dataset_on_its_own(root):
    plan = plan_steps(_settings(_toml(root)))
    assert plan.ok, plan.errors
    first, second = plan.datasets
    # dataset 1: 2 images × 3 repeats = 6 train samples; its 4 reg images balance to 6 samples; batch 2
    assert (first.samples, first.batches, first.batch_size, first.resolution) == (12, 6, 2, (64, 64))
    # dataset 2: 3 images × 2 repeats, batch 4 (the setting): one bucket of 6 -> 2 batches
    assert (second.samples, second.batches, second.batch_size, second.resolution) == (6, 2, 4, (96, 64))
    assert plan.batches_per_epoch == 8 and plan.steps_per_epoch == 8 and plan.total_steps == 16
    assert (plan.train_samples, plan.reg_samples, plan.train_images, plan.reg_images) == (12, 6, 5, 4)
    reg_line = [line for line in plan.per_folder if line.is_reg][0]
    assert reg_line.repeat_groups == ((2, 2), (2, 1)) and reg_line.dataset == 0


def test_the_plan_shows_each_dataset_and_subset(root):
    plan = plan_steps(_settings(_toml(root)))
    text = plan.summary()
    assert plan.formula == ("dataset 1: 2 images × 3 repeats × 2 (reg) ÷ batch 2 = 6 batches + dataset 2: "
                            "3 images × 2 repeats ÷ batch 4 = 2 batches (each bucket's last batch rounded up from 1.5); "
                            "8 batches per epoch × 2 epochs = 16 steps")
    lines = text.splitlines()
    assert lines[1] == f"datasets from {root / 'dataset.toml'}:"
    assert lines[2] == "dataset 1 [datasets[0]]: resolution 64x64, batch 2, no buckets: 12 samples (6 reg) = 6 batches"
    assert lines[3] == f"  subset [datasets[0].subsets[0]] {root / 'a' / 'x'}: 2 images × 3 repeats = 6 samples, " \
                       "2 caption files"
    assert lines[4].startswith(f"  reg subset [datasets[0].subsets[1]] {root / 'r' / 'z'}: (2 images × 2 repeats + "
                               "2 images × 1 repeat) = 6 samples (repeats balanced")
    assert lines[6] == "dataset 2 [datasets[1]]: resolution 96x64, batch 4, no buckets: 6 samples = 2 batches"
    assert lines[7].startswith(f"  subset [datasets[1].subsets[0]] {root / 'b' / 'y'}: 3 images × 2 repeats = 6 samples")


def test_grad_accum_and_max_train_steps_in_the_formula(root):
    plan = plan_steps(_settings(_toml(root), gradient_accumulation_steps=3, max_train_steps=5))
    assert plan.steps_per_epoch == 3 and plan.total_steps == 5 and plan.epochs == 2
    assert plan.formula.startswith("max_train_steps = 5 steps (set directly); one epoch = dataset 1: ")
    assert plan.formula.endswith("8 batches per epoch = 8 batches ÷ grad accum 3 = 3 steps (rounded up), so 2 epochs")


def test_folder_runs_ignore_dataset_config_when_it_is_empty(root):
    settings = settings_from_dict({"dataset_config": "", "train_data_dir": str(root / "img"), "epoch": 1}).settings
    make_image_folder(root / "img", {"2_cat": 2}, sizes=[(64, 64)], seed=5)
    plan = plan_steps(settings)
    assert plan.ok and not plan.datasets and plan.total_steps == 4


# --- the dataset: batches per dataset, per-image settings from the subset ----------------------------------------

def test_batches_never_mix_datasets_and_follow_each_dataset_s_batch_size(root):
    plan = plan_steps(_settings(_toml(root)))
    dataset = TrainingDataset(plan.entries, DatasetConfig(batch_size=99, seed=3))
    assert len(dataset) == plan.batches_per_epoch == 8
    for epoch in (1, 2):
        batches = dataset.epoch_batches(epoch)
        assert sum(len(b) for b in batches) == 18
        for members in batches:
            datasets = {dataset.entries[m].item.dataset for m in members}
            assert len(datasets) == 1
            assert len(members) <= dataset.entries[members[0]].item.subset.batch_size
        assert {len(b) for b in batches if dataset.entries[b[0]].item.dataset == 0} == {2}
    assert dataset.epoch_batches(1) != dataset.epoch_batches(2)


def test_captions_and_flips_follow_each_image_s_subset(root):
    plan = plan_steps(_settings(_toml(root)))
    dataset = TrainingDataset(plan.entries, DatasetConfig(batch_size=1, seed=1))
    captions, flips = {}, {}
    for batch in dataset.iter_epoch(1):
        for path, caption, flipped in zip(batch.paths, batch.captions, batch.flipped):
            captions.setdefault(path.parent.name, set()).add(caption)
            flips.setdefault(path.parent.name, set()).add(flipped)
    assert captions["x"] == {""}  # caption_dropout_rate = 1.0 in that subset only
    assert captions["z"] == {"dog"}  # class_tokens for reg images without caption files
    assert all(c.startswith("y, ") for c in captions["y"])
    assert flips["y"] == {False, True} and flips["x"] == {False} and flips["z"] == {False}


def test_caption_prefix_and_suffix_join_with_a_space_before_dropout(root):
    text = TWO_DATASETS.replace("num_repeats = 2", "num_repeats = 2\n  caption_prefix = 'photo of'\n"
                                                   "  caption_suffix = 'best quality'")
    plan = plan_steps(_settings(_toml(root, text, "prefix.toml")))
    dataset = TrainingDataset(plan.entries, DatasetConfig(batch_size=1, seed=1))
    captions = {c for batch in dataset.iter_epoch(1) for p, c in zip(batch.paths, batch.captions) if p.parent.name == "y"}
    assert captions and all(c.startswith("photo of y, ") and c.endswith(" best quality") for c in captions)
    assert not DatasetConfig.from_settings(_settings(_toml(root, text, "prefix.toml"))).captions.is_static


def test_text_encoder_outputs_are_not_cached_when_a_subset_rewrites_captions(root):
    assert not DatasetConfig.from_settings(_settings(_toml(root))).captions.is_static
    static = _toml(root, TWO_DATASETS.replace("shuffle_caption = true", "").replace("caption_dropout_rate = 1.0", ""),
                   "static.toml")
    assert DatasetConfig.from_settings(_settings(static)).captions.is_static


# --- the check ---------------------------------------------------------------------------------------------------

def _dataset_problems(report):
    return [p for p in report.problems if p.field in ("dataset_config", "train_data_dir", "reg_data_dir", None)]


def test_the_check_passes_a_good_file_and_shows_the_subsets(root):
    report = check(_settings(_toml(root)), deep=False)
    assert not [p for p in _dataset_problems(report) if p.severity == "error"], report.format()
    assert "subset [datasets[1].subsets[0]]" in report.format()


def test_the_check_names_a_missing_image_dir_and_the_ignored_folder_settings(root):
    text = TWO_DATASETS.replace("{root}/b/y", "{root}/b/missing")
    report = check(_settings(_toml(root, text, "missing.toml"), train_data_dir=str(root / "a")), deep=False)
    [error] = [p for p in report.errors if p.field == "dataset_config"]
    assert error.message.startswith(f"dataset_config {root / 'missing.toml'}: [datasets[1].subsets[0]] image_dir: ")
    assert error.file == str(root / "b" / "missing") and "does not exist" in error.message
    [ignored] = [p for p in report.warnings if p.field == "train_data_dir"]
    assert "is not used" in ignored.message


def test_the_check_names_keys_nekoya_does_not_apply_and_cache_conflicts(root):
    text = TWO_DATASETS.replace("num_repeats = 2", "num_repeats = 2\n  keep_tokens_separator = '|||'\n  color_aug = true")
    report = check(_settings(_toml(root, text, "conflict.toml"), cache_latents=True), deep=False)
    messages = [p.message for p in report.problems if p.field == "dataset_config"]
    assert any("[datasets[1].subsets[0]] keep_tokens_separator = \"|||\": is not applied" in m for m in messages), messages
    assert any("[datasets[1].subsets[0]] color_aug = true" in m and "cannot be cached" in m for m in messages)
    flip = check(_settings(_toml(root), cache_latents=True), deep=False)
    assert [p for p in flip.errors if "flip_aug = true with cached latents" in p.message]
    assert not [p for p in check(_settings(_toml(root), cache_latents=True, flip_aug=True), deep=False).errors
                if p.field == "dataset_config"]


def test_a_bad_bucket_setting_names_its_dataset(root):
    text = TWO_DATASETS.replace("enable_bucket = false\n\n  [[datasets.subsets]]\n  image_dir = \"{root}/a/x\"",
                                "enable_bucket = true\nmin_bucket_reso = 128\n\n  [[datasets.subsets]]\n"
                                "  image_dir = \"{root}/a/x\"")
    report = check(_settings(_toml(root, text, "buckets.toml")), deep=False)
    [error] = [p for p in report.errors if "min_bucket_reso" in p.message]
    assert error.field == "dataset_config" and "[datasets[0]] min_bucket_reso" in error.message


# --- a tiny training run ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_datasets_and_a_reg_subset_train(tiny_sd1_dir, root, tmp_path):
    from trainer import events as ev
    from trainer.loop import train

    settings = _settings(
        _toml(root), pretrained_model_name_or_path=str(tiny_sd1_dir), output_dir=str(tmp_path / "out"),
        output_name="toml", max_resolution="64,64", epoch=1, max_train_steps=4, learning_rate=1e-3,
        optimizer="AdamW", lr_scheduler="constant", lr_warmup=0, network_dim=4, network_alpha=4, seed=7,
        save_every_n_epochs=0, mixed_precision="no", save_precision="float", cache_latents=False)
    events = []
    result = train(settings, events.append)
    assert result.status == "finished", result.error
    [started] = [e for e in events if isinstance(e, ev.Started)]
    assert started.total_steps == 4 and "dataset 2 [datasets[1]]" in started.plan
    assert "reg subset [datasets[0].subsets[1]]" in started.plan
    assert [e.step for e in events if isinstance(e, ev.Step)] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "toml.safetensors").is_file()
