"""Merge LoRA (sd-scripts' merge_lora.py: factors added or concatenated) and SVD merge (svd_merge_lora.py: the
summed weight changes at a new rank) on small LoRA files with known tensors; metadata, CLI, GUI and refusals."""
from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_tools_support import one_thread, random_lora  # noqa: F401  (fixture)
from trainer.commands import lora_cmd
from trainer.saving import sshs_hashes
from trainer.tools import ToolError, read_lora, verify_lora
from trainer.tools.merge_loras import merge_loras
from trainer.tools.svd_merge import svd_merge_loras

LINEAR, CONV, ONE_BY_ONE, ONLY_B = "lora_unet_x_to_q", "lora_unet_x_conv1", "lora_unet_x_proj_in", "lora_te_x_fc1"
# module -> (out, input shape); the conv's 10 input channels let a rank-8 sum through (sd-scripts caps at in/out)
SHAPES = {LINEAR: (16, (12,)), CONV: (8, (10, 3, 3)), ONE_BY_ONE: (8, (6, 1, 1)), ONLY_B: (6, (5,))}


def module(name: str, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    out, in_shape = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *in_shape, generator=g)
    up = torch.randn(out, rank, *((1, 1) if len(in_shape) == 3 else ()), generator=g)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


def lora_file(path, modules: dict, metadata: dict | None = None):
    save_file({k: v for m in modules.values() for k, v in m.items()}, str(path), metadata or {})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a and b: rank 4 with different alphas (b also has a module a lacks); c: rank 2."""
    folder = tmp_path_factory.mktemp("merge_loras")
    a = {LINEAR: module(LINEAR, 4, 2.0, 1), CONV: module(CONV, 4, 4.0, 2), ONE_BY_ONE: module(ONE_BY_ONE, 4, 4.0, 3)}
    b = {LINEAR: module(LINEAR, 4, 8.0, 4), CONV: module(CONV, 4, 1.0, 5), ONE_BY_ONE: module(ONE_BY_ONE, 4, 4.0, 6),
         ONLY_B: module(ONLY_B, 4, 4.0, 7)}
    c = {LINEAR: module(LINEAR, 2, 2.0, 8), CONV: module(CONV, 2, 2.0, 9)}
    meta = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.title": "Style A",
            "modelspec.architecture": "stable-diffusion-v1/lora", "ss_network_dim": "4"}
    return {"a": lora_file(folder / "a.safetensors", a, meta), "b": lora_file(folder / "b.safetensors", b),
            "c": lora_file(folder / "c.safetensors", c), "folder": folder}


def delta(file, name: str) -> torch.Tensor:
    """The module's ΔW = alpha/rank · up @ down, flattened to out × in."""
    return read_lora(file).modules[name].delta().flatten(1)


def factors(file, name: str):
    m = read_lora(file).modules[name]
    return m.down, m.up, m.alpha


def test_added_factors_are_sd_scripts_formula(files, tmp_path):
    # sd-scripts: s = ratio·√(alpha/alpha_first); down = Σ s·down, up = Σ |s|·up; alpha = alpha_first
    ratios = {"a": 0.7, "b": -0.4}
    result = merge_loras([(files["a"], 0.7), (files["b"], -0.4)], tmp_path / "m.safetensors")
    merged = read_lora(result.out_path)
    for name in (LINEAR, CONV, ONE_BY_ONE):
        alpha0 = factors(files["a"], name)[2]
        down = up = 0
        for key, ratio in ratios.items():
            d, u, alpha = factors(files[key], name)
            s = ratio * math.sqrt(alpha / alpha0)
            down, up = down + s * d, up + abs(s) * u
        got = merged.modules[name]
        torch.testing.assert_close(got.down, down)
        torch.testing.assert_close(got.up, up)
        assert (got.alpha, got.rank) == (alpha0, 4)
    only_b = merged.modules[ONLY_B]  # in b only: b's alpha, b's factors times -0.4 and 0.4
    d, u, alpha = factors(files["b"], ONLY_B)
    torch.testing.assert_close(only_b.down, -0.4 * d)
    torch.testing.assert_close(only_b.up, 0.4 * u)
    assert only_b.alpha == alpha and result.partial == 1 and result.method == "add"


def test_one_file_at_ratio_k_changes_by_k_times_abs_k(files, tmp_path):
    result = merge_loras([(files["a"], -0.5)], tmp_path / "half.safetensors")
    torch.testing.assert_close(delta(result.out_path, LINEAR), -0.25 * delta(files["a"], LINEAR))


def test_concat_stacks_the_factors_and_keeps_the_first_alpha(files, tmp_path):
    # sd-scripts --concat: down = [s_a·down_a; s_c·down_c], up = [|s_a|·up_a, |s_c|·up_c], alpha = alpha_a, so
    # ΔW = Σ ratio·|ratio|·rank/R·ΔW (R = 4 + 2)
    result = merge_loras([(files["a"], 1.0), (files["c"], 0.5)], tmp_path / "cat.safetensors", concat=True)
    merged = read_lora(result.out_path)
    for name in (LINEAR, CONV):
        (da, ua, alpha_a), (dc, uc, alpha_c) = factors(files["a"], name), factors(files["c"], name)
        s_c = 0.5 * math.sqrt(alpha_c / alpha_a)
        torch.testing.assert_close(merged.modules[name].down, torch.cat([da, s_c * dc]))
        torch.testing.assert_close(merged.modules[name].up, torch.cat([ua, s_c * uc], 1))
        assert (merged.modules[name].rank, merged.modules[name].alpha) == (6, alpha_a)
        expected = 4 / 6 * delta(files["a"], name) + 0.25 * 2 / 6 * delta(files["c"], name)
        torch.testing.assert_close(delta(result.out_path, name), expected)
    assert result.ranks == {6: 2, 4: 1} and result.metadata["ss_network_dim"] == "Dynamic"


def test_svd_merge_is_exact_when_the_rank_holds_the_sum(files, tmp_path):
    # ΔW = 0.7·ΔW_a − 0.4·ΔW_b has rank ≤ 8: asking 16 writes rank 8 (what the sum has) and loses nothing
    result = svd_merge_loras([(files["a"], 0.7), (files["b"], -0.4)], tmp_path / "svd.safetensors", 16,
                             clamp_quantile=None)
    merged = read_lora(result.out_path)
    for name in (LINEAR, CONV, ONE_BY_ONE):
        expected = 0.7 * delta(files["a"], name) - 0.4 * delta(files["b"], name)
        torch.testing.assert_close(delta(result.out_path, name), expected, rtol=1e-4, atol=1e-4)
        assert merged.modules[name].alpha == merged.modules[name].rank  # scale 1, as sd-scripts
    assert {name: m.rank for name, m in merged.modules.items()} == {LINEAR: 8, CONV: 8, ONE_BY_ONE: 6, ONLY_B: 4}
    assert result.overall_error < 1e-5 and "lower rank" in result.format()


def test_svd_merge_at_a_low_rank_is_the_best_approximation(files, tmp_path):
    result = svd_merge_loras([(files["a"], 1.0), (files["c"], 1.0)], tmp_path / "r2.safetensors", 2, conv_rank=3,
                             clamp_quantile=None)
    for name, rank in ((LINEAR, 2), (CONV, 3)):
        target = delta(files["a"], name) + delta(files["c"], name)
        singular = torch.linalg.svdvals(target.double())
        best = float(singular[rank:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt())  # Eckart–Young
        got = float((delta(result.out_path, name) - target).norm() / target.norm())
        info = next(m for m in result.modules if m.name == name)
        assert got == pytest.approx(best, rel=1e-3) and info.relative_error == pytest.approx(best, rel=1e-3)
        assert info.rank == rank
    assert result.metadata["ss_network_dim"] == "2" and json.loads(result.metadata["ss_network_args"]) == \
        {"conv_dim": "3", "conv_alpha": "3"}


def test_svd_merge_clamps_factor_values_beyond_the_quantile(files, tmp_path):
    free = svd_merge_loras([(files["a"], 1.0)], tmp_path / "free.safetensors", 4, clamp_quantile=None)
    clamped = svd_merge_loras([(files["a"], 1.0)], tmp_path / "clamped.safetensors", 4, clamp_quantile=0.5)
    m_free, m_clamped = read_lora(free.out_path).modules[LINEAR], read_lora(clamped.out_path).modules[LINEAR]
    values = torch.cat([m_free.up.flatten(), m_free.down.flatten()]).abs()
    limit = float(values.sort().values[int(round(0.5 * (values.numel() - 1)))])
    assert float(torch.cat([m_clamped.up.flatten(), m_clamped.down.flatten()]).abs().max()) == pytest.approx(limit)
    assert clamped.overall_error > free.overall_error


def test_metadata_versions_titles_and_hashes(files, tmp_path):
    result = merge_loras([(files["a"], 1.0), (files["b"], 1.0)], tmp_path / "meta.safetensors", save_precision="fp16")
    with safe_open(result.out_path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "Dynamic"  # alphas 2, 4 and 4 (first file's)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.merged_from"] == "Style A, b" and meta["modelspec.title"] == "meta"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    unhashed = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, unhashed)
    assert {t.dtype for t in tensors.values()} == {torch.float16} and result.dtype == "float16"
    svd = svd_merge_loras([(files["a"], 1.0)], tmp_path / "svd_meta.safetensors", 4)
    assert (svd.metadata["ss_network_dim"], svd.metadata["ss_network_alpha"]) == ("4", "4")


def test_merged_sd1_loras_still_fit_the_model_and_svd_keeps_the_sum(tmp_path, tiny_sd1_dir):
    a = random_lora(tmp_path, tiny_sd1_dir, "sd1_a", rank=4, conv_rank=2, seed=1)
    b = random_lora(tmp_path, tiny_sd1_dir, "sd1_b", rank=4, alpha=4.0, conv_rank=2, seed=2)
    added = merge_loras([(a, 0.5), (b, 0.5)], tmp_path / "added.safetensors")
    svd = svd_merge_loras([(a, 1.0), (b, -0.5)], tmp_path / "svd.safetensors", 8, conv_rank=4, clamp_quantile=None)
    for result in (added, svd):
        assert verify_lora(result.out_path, tiny_sd1_dir).ok
    before_a, before_b, after = read_lora(a), read_lora(b), read_lora(svd.out_path)
    assert set(after.modules) == set(before_a.modules)
    for name, module in after.modules.items():
        expected = before_a.modules[name].delta() - 0.5 * before_b.modules[name].delta()
        torch.testing.assert_close(module.delta(), expected, rtol=1e-4, atol=1e-5)


# ---- refusals ----------------------------------------------------------------------------------------------

def test_rank_mismatch_is_refused_naming_the_file_module_and_the_fixes(files, tmp_path):
    with pytest.raises(ToolError) as err:
        merge_loras([(files["a"], 1.0), (files["c"], 1.0)], tmp_path / "x.safetensors")
    text = str(err.value)
    assert f"c.safetensors has rank 2 for {CONV} but a.safetensors has rank 4" in text
    assert "--concat" in text and "SVD merge" in text and not (tmp_path / "x.safetensors").exists()


def test_lycoris_sdxl_and_missing_files_are_refused(files, tmp_path):
    loha = {f"lora_unet_x_to_q.hada_{part}": torch.randn(*shape) for part, shape in
            (("w1_a", (16, 2)), ("w1_b", (2, 12)), ("w2_a", (16, 2)), ("w2_b", (2, 12)))}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    # SD 1.x: CLIP-L's 768-wide q_proj; SDXL: SGM block names
    sd1_q = _renamed(module(LINEAR, 4, 4.0, 1), "lora_te_q_self_attn_q_proj", 768)
    sd1 = lora_file(tmp_path / "sd1.safetensors", {"q": sd1_q})
    sdxl = lora_file(tmp_path / "sdxl.safetensors", {"x": _renamed(module(LINEAR, 4, 4.0, 2),
                                                                   "lora_unet_input_blocks_4_1_proj_in")})
    cases = [([files["a"], tmp_path / "loha.safetensors"], "loha.safetensors is a LyCORIS LoHa file"),
             ([sd1, sdxl], "sdxl.safetensors is a LoRA for SDXL but sd1.safetensors is for SD 1"),
             ([files["a"], tmp_path / "gone.safetensors"], "LoRA file not found"),
             ([], "choose at least one LoRA")]
    for loras, message in cases:
        for tool in (merge_loras, svd_merge_loras):
            with pytest.raises(ToolError, match=message):
                tool(loras, tmp_path / "x.safetensors")
    assert "Merge into checkpoint" in _refusal(merge_loras, [files["a"], tmp_path / "loha.safetensors"], tmp_path)


def _renamed(tensors: dict, name: str, in_dim: int | None = None) -> dict:
    renamed = {f"{name}.{key.partition('.')[2]}": value for key, value in tensors.items()}
    if in_dim:
        renamed[f"{name}.lora_down.weight"] = torch.randn(4, in_dim)
    return renamed


def _refusal(tool, loras, tmp_path) -> str:
    with pytest.raises(ToolError) as err:
        tool(loras, tmp_path / "x.safetensors")
    return str(err.value)


def test_an_existing_output_or_an_input_as_output_is_refused(files, tmp_path):
    out = tmp_path / "once.safetensors"
    merge_loras([(files["a"], 1.0)], out)
    before = out.read_bytes()
    with pytest.raises(ToolError, match="already exists"):
        svd_merge_loras([(files["a"], 1.0)], out, 2)
    assert out.read_bytes() == before
    svd_merge_loras([(files["a"], 1.0)], out, 2, overwrite=True)
    assert {m.rank for m in read_lora(out).modules.values()} == {2}
    with pytest.raises(ToolError, match="is one of the input files"):
        merge_loras([(files["a"], 1.0)], files["a"], overwrite=True)
    with pytest.raises(ToolError, match="must end in"):
        merge_loras([(files["a"], 1.0)], tmp_path / "x.txt")
    with pytest.raises(ToolError, match="unknown precision"):
        merge_loras([(files["a"], 1.0)], tmp_path / "y.safetensors", precision="fp8")


# ---- command line and Tools tab ------------------------------------------------------------------------------

def run(*argv):
    parser = argparse.ArgumentParser(prog="trainer")
    lora_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lora", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    return lora_cmd.run(args, out=out, err=err), out.getvalue(), err.getvalue()


def test_cli_merge_loras_and_svd_merge(files, tmp_path):
    out = tmp_path / "cli.safetensors"
    code, text, _ = run("merge-loras", "--lora", f"{files['a']}:0.7", "--lora", f"{files['b']}:-0.4", "-o", out)
    assert code == 0 and "Merged LoRA" in text and "a.safetensors ×0.7" in text
    torch.testing.assert_close(read_lora(out).modules[LINEAR].down, read_lora(merge_loras(
        [(files["a"], 0.7), (files["b"], -0.4)], tmp_path / "api.safetensors").out_path).modules[LINEAR].down)
    code, _, err = run("merge-loras", "--lora", files["a"], "--lora", files["c"], "-o", tmp_path / "no.safetensors")
    assert code == 1 and "\nerror: c.safetensors has rank 2" in err and "Traceback" not in err
    code, text, _ = run("merge-loras", "--lora", files["a"], "--lora", files["c"], "--concat", "-o",
                        tmp_path / "cat.safetensors", "--save-precision", "bf16", "--json")
    assert code == 0 and json.loads(text)["method"] == "concat" and json.loads(text)["dtype"] == "bfloat16"
    code, text, _ = run("svd-merge", "--lora", files["a"], "--lora", f"{files['c']}:0.5", "-o",
                        tmp_path / "svd.safetensors", "--rank", "3", "--conv-rank", "2", "--no-clamp", "--modules")
    assert code == 0 and f"{LINEAR}  linear r3" in text and f"{CONV}  conv3x3 r2" in text
    code, _, err = run("svd-merge", "--lora", files["a"], "-o", tmp_path / "svd.safetensors")
    assert code == 1 and "already exists" in err


def test_tools_tab_handlers_write_the_files_and_show_refusals(files, tmp_path):
    from app import tools_actions as tools

    logged = []
    slots = [(str(files["a"]), 0.7), ("", 1.0), (str(files["b"]), -0.4), ("  ", 1.0)]
    status, report = tools.merge_loras(slots, str(tmp_path / "gui"), log=logged.append)
    assert "Saved" in status and (tmp_path / "gui.safetensors").is_file() and "Merged LoRA" in report
    assert any("loading" in line for line in logged)
    status, report = tools.svd_merge(slots, str(tmp_path / "gui_svd.safetensors"), 8, 0, 1.0, "fp16")
    assert "Saved" in status and "lora_unet_x_to_q  linear r8" in report
    assert read_lora(tmp_path / "gui_svd.safetensors").dtypes == ("float16",)

    assert "at least one LoRA file" in tools.merge_loras([("", 1.0)], str(tmp_path / "o"))[0]
    assert "the output file" in tools.svd_merge(slots, "", 4)[0]
    status, _ = tools.merge_loras([(str(files["a"]), 1.0), (str(files["c"]), 1.0)], str(tmp_path / "bad"))
    assert "Not merged" in status and "has rank 2" in status and "nk-error" in status
    status, _ = tools.svd_merge(slots, str(tmp_path / "gui_svd.safetensors"), 8)
    assert "already exists" in status
    assert "New rank is empty" in tools.svd_merge(slots, str(tmp_path / "r"), None)[0]
    assert "The ratio of a.safetensors is empty" in tools.merge_loras([(str(files["a"]), "")], str(tmp_path / "r"))[0]


def test_inspect_shows_a_dash_for_a_lycoris_module_norm(tmp_path):
    from app import tools_actions as tools

    loha = {f"lora_unet_x_to_q.hada_{part}": torch.randn(*shape) for part, shape in
            (("w1_a", (16, 2)), ("w1_b", (2, 12)), ("w2_a", (16, 2)), ("w2_b", (2, 12)))}
    save_file({**loha, **module(CONV, 4, 4.0, 1)}, str(tmp_path / "mixed.safetensors"))
    _, _, _, modules = tools.inspect(str(tmp_path / "mixed.safetensors"))
    norms = {row[0]: row[5] for row in modules["data"]}
    assert norms["lora_unet_x_to_q"] == tools.NO_NORM and float(norms[CONV]) > 0


def test_the_app_s_merge_buttons_and_the_newest_lora_in_the_first_slots(files, tmp_path):
    pytest.importorskip("gradio")
    from gui_app_support import component, fresh_app, run_handlers

    app = fresh_app(tmp_path / "presets")
    slots = {component(app, f"{tool}_{field}"): value for tool in ("merge_loras", "svd_merge")
             for field, value in (("lora_1", str(files["a"])), ("ratio_1", 0.7), ("lora_2", str(files["b"])),
                                  ("ratio_2", -0.4), ("out", str(tmp_path / f"{tool}.safetensors")))}
    for tool in ("merge_loras", "svd_merge"):
        [result] = run_handlers(app, component(app, f"{tool}_run"), "click", slots)
        assert "Saved" in result[0], result[0]
    assert read_lora(tmp_path / "svd_merge.safetensors").modules[LINEAR].rank == 4  # the declared rank
    folder = tmp_path / "output"
    folder.mkdir()
    newest = folder / "run.safetensors"
    newest.write_bytes(files["a"].read_bytes())
    output_dir = component(app, "setting_output_dir")
    results = run_handlers(app, component(app, "tab_tools"), "select", {output_dir: str(folder)})
    for tool in ("merge_loras", "svd_merge"):
        box = component(app, f"{tool}_lora_1")
        assert [r[box] for r in results if isinstance(r, dict) and box in r] == [str(newest)]
