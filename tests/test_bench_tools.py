"""The benchmark helpers measure what they claim: step gaps skip warm-up, the bare loop's LoRA starts as
the identity, and the sd-scripts view keeps the same weights under transformers 4's key names."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import profile_train  # noqa: E402
import sd_scripts_view  # noqa: E402


def test_median_gap_ignores_the_warm_up_steps():
    # steps end at t = 0, 10, 11, 12.5, 13.5, 14.5: the first gaps (compile, first allocations) are skipped
    stamps = [0.0, 10.0, 11.0, 12.5, 13.5, 14.5]
    assert profile_train._median_gap(stamps) == 1.0
    assert profile_train._median_gap(stamps[:3]) is None  # no gap after warm-up yet


def test_train_speed_leaves_latent_encoding_out_of_the_step_time():
    import train_speed

    # steps 2 s apart after warm-up; a 1 s VAE encode fell inside two of the three gaps
    stamps = [0.0, 5.0, 6.0, 8.0, 10.0, 12.0]
    assert train_speed._median_gaps(stamps) == 2.0
    assert train_speed._median_gaps(stamps, [(6.5, 7.5), (10.2, 11.2)]) == 1.0
    assert train_speed._median_gaps(stamps, [(7.5, 8.5)]) == 1.5  # half inside one gap, half inside the next
    assert train_speed.SIZES["sdxl"].family == "sdxl" and train_speed.SIZES["sd15"].resolution == 512


def test_bare_lora_starts_as_the_identity_and_trains():
    import torch

    class Transformer2DModel(torch.nn.Module):  # the class name is what the injector matches
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Conv2d(4, 6, 1)
            self.to_q = torch.nn.Linear(6, 6)
            self.conv3 = torch.nn.Conv2d(6, 6, 3, padding=1)  # 3x3 convs are not LoRA targets

        def forward(self, x):
            h = self.conv3(self.proj_in(x))
            return self.to_q(h.permute(0, 2, 3, 1))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Transformer2DModel())
    x = torch.randn(1, 4, 3, 3)
    before = model(x).detach()
    params = profile_train._inject_lora(model, ("Transformer2DModel",), rank=2, alpha=2.0)
    assert len(params) == 4  # down + up for proj_in and to_q only
    assert torch.equal(model(x), before)  # up weights start at zero
    with torch.no_grad():
        params[1].fill_(0.1)  # proj_in's up projection
    assert not torch.allclose(model(x), before)


def test_sd_scripts_view_keeps_the_weights_under_transformers4_names(tiny_sd1_dir, tmp_path):
    from safetensors.torch import load_file

    info = sd_scripts_view.make_view(Path(tiny_sd1_dir), tmp_path / "view", tmp_path / "tok", real_vocab=False)
    source = load_file(Path(tiny_sd1_dir) / "text_encoder" / "model.safetensors")
    rekeyed = load_file(tmp_path / "view" / "text_encoder" / "model.safetensors")
    assert info["text_encoder_tensors"] == len(source) == len(rekeyed)
    for key, tensor in source.items():
        new_key = key if key.startswith("text_model.") else "text_model." + key
        assert rekeyed[new_key].equal(tensor)
    for name in ("unet", "vae", "scheduler", "model_index.json"):
        assert (tmp_path / "view" / name).resolve() == (Path(tiny_sd1_dir) / name).resolve()
    tokenizer = tmp_path / "tok" / sd_scripts_view.TOKENIZER_NAME
    assert (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    vocab = json.loads((tokenizer / "vocab.json").read_text())
    config = json.loads((Path(tiny_sd1_dir) / "text_encoder" / "config.json").read_text())
    assert len(vocab) == config["vocab_size"]  # the tokenizer fits the model's embedding table


def test_profile_train_refuses_to_run_without_the_benchmark_model(tmp_path):
    args = profile_train.build_parser().parse_args(["--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="train_speed.py --size tiny"):
        profile_train.bench_paths(args)


@pytest.mark.slow
def test_train_speed_prints_one_json_line_with_the_figures(tmp_path):
    """The benchmark as a user runs it: builds the tiny model and images, trains in a child, one JSON line."""
    import os
    import subprocess

    script = BENCH / "train_speed.py"
    done = subprocess.run([sys.executable, str(script), "--size", "tiny", "--steps", "5", "--again",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["size"] == "tiny" and result["steps"] == 5 and result["device"] == "cpu"
    for key in ("s_per_step", "cpu_s_per_step", "time_to_first_step_s", "peak_rss_mb", "again_time_to_first_step_s"):
        assert result[key] > 0, key
    assert result["again_time_to_first_step_s"] < result["time_to_first_step_s"]


def test_tensor_bytes_counts_live_storages_once_and_keeps_the_peak():
    import torch

    import memory_peak

    tracker = memory_peak.TensorBytes()
    with tracker:
        a = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
        view = a[:512]  # same storage: not counted again
        b = torch.ones(2048, dtype=torch.bfloat16)  # 4 KiB
        assert tracker.current == 8192
        del a, view, b
    assert tracker.current == 0 and tracker.peak == 8192


@pytest.mark.slow
def test_memory_peak_runs_the_trainer_and_prints_its_figures(tmp_path, capsys):
    import memory_peak

    assert memory_peak.main(["--size", "tiny", "--workdir", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["steps"] == 2 and figures["mixed_precision"] == "bf16"
    # the tiny model's bf16 weights (~1 MiB) are there at the start; a step adds its activations
    assert 0.5 < figures["at_start_mb"] < figures["peak_tensor_mb"] < 64
    assert figures["norms"] == "cuda" and 0 < figures["peak_encode_mb"] <= figures["peak_tensor_mb"]
    assert figures["peak_tensor_mb"] == max(figures["peak_step_mb"], figures["peak_encode_mb"])
    assert figures["preflight_estimate_mb"] > 0


def test_moving_a_module_to_the_cpu_counts_as_freeing_it():
    import torch

    import memory_peak

    tracker = memory_peak.TensorBytes()
    layer = torch.nn.Linear(16, 16, bias=False)  # built outside: not counted
    with tracker:
        layer.to(torch.bfloat16)  # 512 bytes of weight, as the trainer's load converts a model
        assert tracker.current == 512
        tracker.offload(layer)
        assert tracker.current == 0
        del layer  # freed for real later: not subtracted twice
    assert tracker.current == 0 and tracker.peak == 512


def test_norms_follow_cuda_autocast_only_inside_the_stack():
    import contextlib

    import torch
    import torch.nn.functional as F

    import memory_peak

    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    with contextlib.ExitStack() as stack:
        memory_peak.follow_cuda_autocast_norms(stack)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.group_norm(x, 4, weight).dtype == torch.float32  # as CUDA's autocast does
            assert F.layer_norm(x, (4,)).dtype == torch.float32
        assert F.group_norm(x, 4, weight).dtype == torch.bfloat16  # no autocast: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 4, weight).dtype == torch.bfloat16  # the CPU's own rule is back


def test_peaks_of_the_steps_and_of_the_encodes_are_kept_apart():
    import torch

    import memory_peak

    tracker = memory_peak.TensorBytes()
    with tracker:
        kept = torch.zeros(256)  # 1 KiB
        tracker.restart_peaks()
        tracker.phase = "encode"
        big = torch.zeros(1024)  # 4 KiB more while "encoding"
        del big
        tracker.phase = "step"
        step = torch.zeros(512)  # 2 KiB more in a step
        del step, kept
    assert tracker.phase_peaks == {"encode": 5 * 1024, "step": 3 * 1024} and tracker.peak == 5 * 1024
