"""Images no bucket fits (issue #22): what the CLI check, the GUI plan panel and a training run say.

The case: 12 images, 8 of them 512x768, with Max resolution 64,64 and the defaults (Don't upscale
bucket resolution on, Minimum bucket resolution 256). Scaled down to the 64x64 area a 512x768
image is about 52x78: under one 64 px bucket step on its short side, so it is left out.
"""
from __future__ import annotations

import io
import re

import pytest

from app.form import form_values
from app.plan_panel import plan_html
from test_preflight_cli import run_check
from test_preflight_support import valid_config
from trainer.commands import train_cmd
from trainer.devtools.synthetic import make_image_folder
from trainer.settings import TrainingSettings

LEFT_OUT = ["000.png", "001.jpg", "003.jpg", "004.png", "006.png", "007.jpg", "009.jpg", "010.png"]
DEFAULT_BUCKETS = {"max_resolution": "64,64", "min_bucket_reso": 256, "max_bucket_reso": 2048}


def issue_images(root, folder="10_sks dog"):
    return make_image_folder(root, {folder: 12}, sizes=[(512, 768), (512, 768), (512, 512)], seed=0)


@pytest.fixture
def config(tmp_path, tiny_sd1_file):
    images = issue_images(tmp_path / "issue_img")
    return valid_config(tmp_path, tiny_sd1_file, train_data_dir=str(images), train_batch_size=2, epoch=3,
                        **DEFAULT_BUCKETS)


def test_check_says_the_images_are_larger_names_the_fixes_and_counts_only_used_images(tmp_path, config):
    out = run_check(tmp_path, config)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "Preflight: 0 errors, 8 warnings, 1 note; training can start with 4 of 12 images (8 left out)" in text
    assert "smaller than" not in text and "use a larger version" not in text
    assert text.count("is larger than the 64x64 max resolution area; scaled down to fit it, it is about 52x78") == 8
    assert text.count("fix: untick Don't upscale bucket resolution and lower Minimum bucket resolution to 64, "
                      "or raise Max resolution to 128,128, or lower Bucket resolution steps to 48, or remove the image") == 8
    for name in LEFT_OUT:  # each named once, not again in a summary line
        assert len(re.findall(rf"\b{re.escape(name)}: left out", text)) == 1 and text.count(name) == 2  # + its file: line
    plan = text.split("Step plan:\n", 1)[1]
    # 4 × 10 × 3 ÷ 2 = 60 and 4 × 10 = 40: the figures are those of the 4 images used
    assert plan.splitlines()[0] == "  4 images × 10 repeats × 3 epochs ÷ batch 2 = 60 steps"
    assert plan.splitlines()[1] == "  10_sks dog: 4 of 12 images × 10 repeats = 40 samples (8 left out: see the warnings), 12 caption files"


def test_unticking_dont_upscale_needs_a_lower_minimum_then_trains_every_image(tmp_path, config):
    out = run_check(tmp_path, {**config, "bucket_no_upscale": False})
    assert out.returncode == 1
    assert ("error    min_bucket_reso (Minimum bucket resolution): Minimum bucket resolution 256 is larger than "
            "the smaller side of Max resolution (64x64)") in out.stdout
    assert "fix: lower Minimum bucket resolution to 64 or less, or raise Max resolution" in out.stdout
    assert "general:" not in out.stdout  # the error names its setting, and is not repeated by the plan
    out = run_check(tmp_path, {**config, "bucket_no_upscale": False, "min_bucket_reso": 64})
    assert out.returncode == 0, out.stdout
    assert "left out" not in out.stdout and "training can start\n" in out.stdout
    assert "  12 images × 10 repeats × 3 epochs ÷ batch 2 = 180 steps\n" in out.stdout


def test_gui_plan_panel_says_how_many_images_it_trains(config, tmp_path):
    values = form_values(TrainingSettings(**config))
    page = plan_html(values)
    assert "Ready to train with 4 of 12 images (8 left out: see the warnings)." in page
    assert "Ready to train.<" not in page
    assert "4 images × 10 repeats × 3 epochs ÷ batch 2 = 60 steps" in page
    assert "4 of 12 images × 10 repeats = 40 samples" in page
    assert page.count("is larger than the 64x64 max resolution area") == 8
    assert "Fix: untick Don&#x27;t upscale bucket resolution and lower Minimum bucket resolution to 64" in page


@pytest.mark.slow
def test_training_log_names_each_left_out_image_once_with_one_warning_prefix(tmp_path, tiny_sd1_dir):
    images = issue_images(tmp_path / "img", folder="1_sks dog")
    settings = TrainingSettings(
        pretrained_model_name_or_path=str(tiny_sd1_dir), train_data_dir=str(images), output_dir=str(tmp_path / "out"),
        output_name="left_out", network_dim=2, network_alpha=1, optimizer="AdamW", lr_scheduler="constant",
        lr_warmup=0, mixed_precision="no", train_batch_size=2, epoch=1, save_every_n_epochs=0, seed=1, **DEFAULT_BUCKETS,
    )
    out, err = io.StringIO(), io.StringIO()
    assert train_cmd.run(settings, out, err) == train_cmd.EXIT_OK, err.getvalue()
    log = out.getvalue() + err.getvalue()
    assert "warning: warning" not in log and "skipped:" not in log
    for name in LEFT_OUT:
        assert len(re.findall(rf"warning: train_data_dir \(Image folder\): {re.escape(name)}: left out: 512x768 is larger", log)) == 1
    assert "4 images × 1 repeat × 1 epoch ÷ batch 2 = 2 steps" in out.getvalue()
    assert "finished after 2 steps" in out.getvalue()
