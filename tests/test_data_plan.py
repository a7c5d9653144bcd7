"""Step plan: numbers and formula for kohya-style folders, worked out by hand."""
import time
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from trainer.data.folders import ImageItem
from trainer.data.plan import PlanConfig, plan_steps, schedule
from trainer.data.samples import balance_reg_repeats


def _images(folder: Path, sizes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 20 % 255, 90, 160)).save(folder / f"img{i:03d}.png")


def _settings(train_dir, reg_dir="", **overrides):
    values = dict(
        train_data_dir=str(train_dir), reg_data_dir=str(reg_dir) if reg_dir else "", caption_extension=".txt",
        train_batch_size=1, gradient_accumulation_steps=1, epoch=1, max_train_epochs=0, max_train_steps=0,
        max_resolution="512,512", enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024,
        bucket_reso_steps=64, bucket_no_upscale=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_single_folder_formula_and_numbers(tmp_path):
    _images(tmp_path / "img" / "45_subject", [(64, 64)] * 150)
    small = dict(max_resolution="64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    plan = plan_steps(_settings(tmp_path / "img", **small))
    assert plan.errors == ()
    assert (plan.train_images, plan.train_samples, plan.batches_per_epoch) == (150, 6750, 6750)
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (6750, 1, 6750)
    assert plan.formula == "150 images × 45 repeats × 1 epoch ÷ batch 1 = 6750 steps"
    assert plan.per_folder[0].describe() == "45_subject: 150 images × 45 repeats = 6750 samples, 0 caption files"
    assert plan.buckets == (((64, 64), 6750),)


def test_reg_doubles_the_steps(tmp_path):
    _images(tmp_path / "img" / "10_sks dog", [(512, 512)] * 3)  # 30 train samples
    _images(tmp_path / "reg" / "1_dog", [(512, 512)] * 5)  # 5 reg samples -> balanced up to 30
    plan = plan_steps(_settings(tmp_path / "img", tmp_path / "reg", epoch=2))
    assert (plan.train_samples, plan.reg_samples, plan.reg_images) == (30, 30, 5)
    assert (plan.batches_per_epoch, plan.total_steps) == (60, 120)
    assert plan.formula == "3 images × 10 repeats × 2 (reg) × 2 epochs ÷ batch 1 = 120 steps"
    reg_line = plan.per_folder[1]
    assert reg_line.is_reg and reg_line.samples == 30
    # 5 images × 6 repeats: balancing gave each of the 5 reg images 5 more repeats than the folder's 1
    assert reg_line.describe() == (
        "reg 1_dog: 5 images × 6 repeats = 30 samples (repeats balanced to the train samples; the folder says 1), "
        "0 caption files"
    )


def test_balance_reg_repeats_sd_scripts_rules():
    def item(name, repeats):
        return ImageItem(Path(name), 8, 8, "", repeats, True, "f", False)

    reg = [item("a", 1), item("b", 1), item("c", 1)]
    # 3 registered with 1 each (n=3), then round robin a,b,c,a,b,c,a -> a=4, b=3, c=3 reaches 10
    assert [(i.path.name, r) for i, r in balance_reg_repeats(10, reg)] == [("a", 4), ("b", 3), ("c", 3)]
    big = [item("a", 10), item("b", 10), item("c", 10)]
    # a (10), b (20 >= 15): stop; c unused and the overshoot stays
    assert [(i.path.name, r) for i, r in balance_reg_repeats(15, big)] == [("a", 10), ("b", 10)]
    assert balance_reg_repeats(0, reg) == []


def test_reg_overshoot_and_unused_reg_images(tmp_path):
    _images(tmp_path / "img" / "5_x", [(512, 512)] * 3)  # 15 train samples
    _images(tmp_path / "reg" / "10_y", [(512, 512)] * 4)  # 10 + 10 = 20 >= 15, two unused
    plan = plan_steps(_settings(tmp_path / "img", tmp_path / "reg"))
    assert (plan.reg_samples, plan.reg_images, plan.total_steps) == (20, 2, 35)
    assert plan.formula == "(3 images × 5 repeats + 20 reg samples) × 1 epoch ÷ batch 1 = 35 steps"
    assert any("2 reg image(s) are never used" in w for w in plan.warnings)
    assert plan.per_folder[1].describe() == (
        "reg 10_y: 2 of 4 images × 10 repeats = 20 samples (2 unused: balancing needs no more), 0 caption files"
    )


def test_uneven_reg_balancing_is_shown_per_repeat_count(tmp_path):
    _images(tmp_path / "img" / "10_x", [(512, 512)])  # 10 train samples
    _images(tmp_path / "reg" / "1_y", [(512, 512)] * 3)  # 3 + round robin 7 more: 4 + 3 + 3
    plan = plan_steps(_settings(tmp_path / "img", tmp_path / "reg"))
    assert plan.per_folder[1].describe().startswith(
        "reg 1_y: (1 image × 4 repeats + 2 images × 3 repeats) = 10 samples (repeats balanced"
    )
    assert plan.formula == "1 image × 10 repeats × 2 (reg) × 1 epoch ÷ batch 1 = 20 steps"


def test_images_no_bucket_fits_are_left_out_of_every_figure(tmp_path):
    """Issue #22: 12 images, 8 of them 512x768 that no 64x64 bucket fits with bucket_no_upscale: every
    number in the plan counts the 4 images used, and the plan says 8 are left out."""
    _images(tmp_path / "img" / "10_sks dog", [(512, 768), (512, 768), (512, 512)] * 4)
    plan = plan_steps(_settings(tmp_path / "img", max_resolution="64,64", bucket_no_upscale=True,
                                train_batch_size=2, epoch=3))
    assert (plan.train_images, plan.train_images_found, plan.train_images_left_out) == (4, 12, 8)
    assert (plan.train_samples, plan.total_steps) == (40, 60)
    assert plan.formula == "4 images × 10 repeats × 3 epochs ÷ batch 2 = 60 steps"  # 4 × 10 × 3 ÷ 2 = 60
    assert plan.per_folder[0].describe() == (
        "10_sks dog: 4 of 12 images × 10 repeats = 40 samples (8 left out: see the warnings), 0 caption files"
    )
    assert plan.readiness() == "Ready to train with 4 of 12 images (8 left out: see the warnings)."
    assert len(plan.skipped) == 8 and all("is larger than the 64x64 max resolution area" in s.reason for s in plan.skipped)
    assert "skipped" not in plan.summary() and "warning:" not in plan.summary()  # the report shows the warnings, once


def test_batches_are_counted_per_bucket(tmp_path):
    _images(tmp_path / "img" / "3_a", [(512, 512)] * 2 + [(1000, 500)] * 3)
    plan = plan_steps(_settings(tmp_path / "img", train_batch_size=4, epoch=2))
    # bucket 512x512: 6 samples -> 2 batches; bucket 704x320: 9 samples -> 3 batches
    assert plan.buckets == (((512, 512), 6), ((704, 320), 9))
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (5, 5, 10)
    assert plan.formula == (
        "5 images × 3 repeats × 2 epochs ÷ batch 4 = 10 steps (not exact: 3.75 steps per epoch, but a batch never "
        "mixes buckets, so each bucket's last batch is rounded up: 2 buckets of 6 + 9 samples = 2 + 3 = 5 batches, "
        "× 2 epochs = 10)"
    )
    assert any("partial batch" in w for w in plan.warnings)


def test_multiple_folders_grad_accum_and_max_train_epochs(tmp_path):
    _images(tmp_path / "img" / "2_a", [(512, 512)] * 3)
    _images(tmp_path / "img" / "1_b", [(1000, 500)] * 4)
    settings = _settings(tmp_path / "img", train_batch_size=2, gradient_accumulation_steps=2)
    plan = plan_steps(settings)
    # 512 bucket: 6 -> 3 batches, 704x320 bucket: 4 -> 2 batches; 5 batches -> ceil(5/2) = 3 steps
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (5, 3, 3)
    assert plan.formula.startswith(
        "(4 images × 1 repeat + 3 images × 2 repeats) × 1 epoch ÷ batch 2 ÷ grad accum 2 = 3 steps"
    )
    settings.max_train_epochs, settings.max_train_steps = 4, 100
    plan = plan_steps(settings)
    assert (plan.epochs, plan.total_steps) == (4, 12)
    assert "(max_train_epochs)" in plan.formula
    assert any("overrides max_train_steps" in w for w in plan.warnings)


def test_max_train_steps_sets_the_total(tmp_path):
    _images(tmp_path / "img" / "3_a", [(512, 512)] * 2)  # 6 steps per epoch
    plan = plan_steps(_settings(tmp_path / "img", max_train_steps=20))
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (6, 4, 20)
    assert plan.formula.startswith("max_train_steps = 20 steps (set directly)")
    assert plan.formula.endswith("so 4 epochs")


def test_schedule_rules():
    assert schedule(10, PlanConfig(epochs=3)) == (10, 3, 30)
    assert schedule(10, PlanConfig(grad_accum=4, epochs=2)) == (3, 2, 6)
    assert schedule(10, PlanConfig(max_train_steps=25)) == (10, 3, 25)
    assert schedule(10, PlanConfig(max_train_steps=25, max_train_epochs=2)) == (10, 2, 20)
    assert schedule(0, PlanConfig(epochs=3)) == (0, 0, 0)


def test_errors_block_the_plan(tmp_path):
    plan = plan_steps(_settings(tmp_path / "missing"))
    assert not plan.ok and "does not exist" in plan.errors[0]
    _images(tmp_path / "img" / "1_a", [(512, 512)])
    plan = plan_steps(_settings(tmp_path / "img", min_bucket_reso=1024))
    assert not plan.ok and any("min_bucket_reso" in e for e in plan.errors)
    plan = plan_steps(_settings(tmp_path / "img", reg_data_dir=str(tmp_path / "noreg")))
    assert not plan.ok and any("reg_data_dir does not exist" in e for e in plan.errors)


def test_upscale_warning(tmp_path):
    _images(tmp_path / "img" / "1_a", [(128, 128)])
    plan = plan_steps(_settings(tmp_path / "img"))
    assert plan.ok and any("enlarged" in w and "128x128" in w for w in plan.warnings)


def test_plan_is_fast_for_hundreds_of_images(tmp_path):
    for folder in ("20_a", "10_b", "5_c"):
        _images(tmp_path / "img" / folder, [(64 + i % 7 * 16, 64 + i % 5 * 16) for i in range(100)])
    settings = _settings(tmp_path / "img", max_resolution="64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    start = time.perf_counter()
    plan = plan_steps(settings)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = plan_steps(settings)
    second = time.perf_counter() - start
    assert plan.train_images == 300 and plan.total_steps == again.total_steps == 3500
    assert first < 1.0 and second < 0.5


def test_plan_from_the_real_settings_model(image_folder):
    from trainer.settings import TrainingSettings

    settings = TrainingSettings(
        train_data_dir=str(image_folder), train_batch_size=2, max_resolution="64,64",
        min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, bucket_no_upscale=False,
    )
    plan = plan_steps(settings)
    # "10_sks dog": 4 images x 10 + "5_cat": 3 x 5 = 55 samples, one 64x64 bucket -> ceil(55 / 2) = 28
    assert plan.ok and (plan.train_samples, plan.batches_per_epoch, plan.total_steps) == (55, 28, 28)
    assert plan.formula.startswith(
        "(4 images × 10 repeats + 3 images × 5 repeats) × 1 epoch ÷ batch 2 = 28 steps (not exact: 27.5 steps per epoch"
    )
    assert plan.formula.endswith("1 bucket of 55 samples = 28 batches, × 1 epoch = 28)")


def test_an_unreadable_image_counts_as_found_and_left_out(tmp_path):
    from trainer.devtools.synthetic import add_corrupt_image

    _images(tmp_path / "img" / "3_a", [(512, 512)] * 2)
    add_corrupt_image(tmp_path / "img" / "3_a", "broken.png")
    plan = plan_steps(_settings(tmp_path / "img"))
    assert plan.per_folder[0].describe() == "3_a: 2 of 3 images × 3 repeats = 6 samples (1 left out: see the warnings), 0 caption files"
    assert plan.formula == "2 images × 3 repeats × 1 epoch ÷ batch 1 = 6 steps"
    assert plan.readiness() == "Ready to train with 2 of 3 images (1 left out: see the warnings)."
