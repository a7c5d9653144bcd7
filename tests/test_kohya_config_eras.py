"""kohya_ss's own LoRA configs of three eras load as they are and pass the check with no unexplained warning:
v21.8.10 and v22.6.2 here, v26 (the current presets and test configs) in test_kohya_fidelity.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.preflight import check
from trainer.preflight.report import SettingNotApplied
from trainer.settings import read_settings_file

DATA = Path(__file__).parent / "data"
CONFIGS = sorted(DATA.glob("kohya_ss_configs_v2*/*.json"))
# the author's machine: folders and the model path do not exist here, which the check rightly says
MACHINE_FIELDS = {"train_data_dir", "reg_data_dir", "output_dir", "logging_dir", "pretrained_model_name_or_path",
                  "sample_prompts", "resume", "network_weights", "dataset_config"}


def test_both_older_eras_are_here():
    assert {p.parent.name for p in CONFIGS} == {"kohya_ss_configs_v21.8.10", "kohya_ss_configs_v22.6.2"}
    assert len(CONFIGS) == 18


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name[-8:]}-{p.stem}")
def test_an_older_kohya_ss_config_loads_and_every_setting_applies(path):
    report = read_settings_file(path)
    assert report.unknown_keys == [], report.unknown_keys  # old names are migrated (conv_dims -> conv_block_dims)
    result = check(report.settings, deep=False)
    assert not [p for p in result.problems if isinstance(p, SettingNotApplied)], result.format()
    assert not [p for p in result.errors if p.field not in MACHINE_FIELDS], result.format()
    assert result.settings_applied() == "Settings: every setting applies."
