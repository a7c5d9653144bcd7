"""kohya_ss's presets quote each optimizer argument ("d0=1e-5" "decouple=True"); kohya_ss drops double quotes."""
import pytest

from trainer.optim.args import OptimConfigError, parse_literal_args


def test_quoted_pairs_lose_their_quotes():
    text = '"d0=1e-5" "d_coef=1.0" "betas=0.9,0.99" "decouple=True"'
    assert parse_literal_args(text, "optimizer_args") == {"d0": 1e-5, "d_coef": 1.0, "betas": (0.9, 0.99),
                                                          "decouple": True}


def test_single_quotes_still_make_a_string_as_in_sd_scripts():
    assert parse_literal_args("step_rules='1:3,0.1:5' \"decay_type=cosine\"", "x") == {
        "step_rules": "1:3,0.1:5", "decay_type": "cosine"}
    with pytest.raises(OptimConfigError):
        parse_literal_args("betas=0.9,(", "optimizer_args")
