"""kohya_ss's presets quote each optimizer argument ("d0=1e-5" "decouple=True"); kohya_ss strips the quotes."""
import pytest

from trainer.optim.args import OptimConfigError, parse_literal_args


def test_quoted_pairs_lose_their_quotes():
    text = '"d0=1e-5" "d_coef=1.0" "betas=0.9,0.99" "decouple=True"'
    assert parse_literal_args(text, "optimizer_args") == {"d0": 1e-5, "d_coef": 1.0, "betas": (0.9, 0.99),
                                                          "decouple": True}


def test_an_unclosed_quote_is_named():
    with pytest.raises(OptimConfigError, match="unclosed quote"):
        parse_literal_args('"d0=1e-5', "optimizer_args")
