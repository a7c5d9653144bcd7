"""End-to-end training on tiny random SD models (CPU, 64 px, a handful of steps)."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_network import expected_te_names, expected_unet_names, module_names
from trainer import events as ev
from trainer.control import Control
from trainer.loop import train
from trainer.noise_sampling import FixedNoise
from trainer.settings import TrainingSettings

pytestmark = pytest.mark.slow  # trains tiny models end to end


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def logs(self) -> str:
        return "\n".join(e.message for e in self.of(ev.Log))


def tiny_settings(model, images, out, **overrides) -> TrainingSettings:
    values = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(images), output_dir=str(out), output_name="tiny",
        max_resolution="64,64", enable_bucket=False, train_batch_size=1, epoch=1, learning_rate=1e-2, unet_lr=1e-2,
        text_encoder_lr=1e-3, optimizer="AdamW", lr_scheduler="constant", lr_warmup=0, network_dim=4, network_alpha=4,
        seed=42, save_every_n_epochs=0, mixed_precision="no", save_precision="float", cache_latents=True,
    )
    values.update(overrides)
    return TrainingSettings(**values)


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 64 px images in one concept folder (a private copy: caching may write next to it)."""
    from trainer.devtools.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("train_images") / "img", {"1_sks dog": 2}, sizes=[(64, 64)], seed=3)


@pytest.fixture(scope="module")
def sd1_run(tiny_sd1_dir, images, tmp_path_factory):
    """4 epochs x 2 steps, per-epoch saves keeping the last 2, fp16 files, TensorBoard logs."""
    out = tmp_path_factory.mktemp("sd1_run")
    settings = tiny_settings(
        tiny_sd1_dir, images, out / "out", epoch=4, save_every_n_epochs=1, save_last_n_epochs=2,
        save_precision="fp16", mixed_precision="fp16", logging_dir=str(out / "logs"),
    )
    recorder = Recorder()
    result = train(settings, recorder, noise=FixedNoise)
    return settings, recorder, result, out


def test_overfit_loss_falls_and_events_in_order(sd1_run):
    _, rec, result, _ = sd1_run
    assert result.status == "finished", result.error
    steps = rec.of(ev.Step)
    assert [s.step for s in steps] == list(range(1, 9))
    assert (steps[-1].loss + steps[-2].loss) < 0.85 * (steps[0].loss + steps[1].loss)
    kinds = [type(e).__name__ for e in rec.events if not isinstance(e, ev.Log)]
    assert kinds[0] == "Started" and kinds[-1] == "Finished"
    assert kinds.index("Step") < kinds.index("Saved")
    started = rec.of(ev.Started)[0]
    assert (started.total_steps, started.total_epochs, started.steps_per_epoch) == (8, 4, 2)
    assert [e.epoch for e in rec.of(ev.EpochEnd)] == [1, 2, 3, 4]
    assert steps[-1].lrs == {"unet": 1e-2, "textencoder": 1e-3} and steps[-1].memory.rss_mb > 0
    assert "fp16 needs a GPU" in rec.logs()  # fp16 on CPU says it trains in fp32
    assert rec.logs().count("fp16 needs a GPU") == 1  # once, though preflight and trainer both know it


def test_epoch_and_final_files(sd1_run):
    settings, rec, result, out = sd1_run
    folder = out / "out"
    assert [(e.kind, os.path.basename(e.path)) for e in rec.of(ev.Saved)] == [
        ("epoch", "tiny-000001.safetensors"), ("epoch", "tiny-000002.safetensors"),
        ("epoch", "tiny-000003.safetensors"), ("final", "tiny.safetensors"),
    ]
    # save_last_n_epochs=2 removed epoch 1; the last epoch is the final file
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "tiny-000002.safetensors", "tiny-000003.safetensors", "tiny.safetensors",
    ]
    assert sorted(os.path.basename(f) for f in result.files) == sorted(p.name for p in folder.glob("*.safetensors"))
    assert rec.of(ev.Finished)[0].files == result.files
    final = load_file(str(folder / "tiny.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.float16}
    assert len(list(folder.glob("tiny_*.json"))) == 1  # settings saved beside the outputs
    saved_settings = json.loads(next(folder.glob("tiny_*.json")).read_text())
    assert saved_settings["network_dim"] == 4 and saved_settings["output_name"] == "tiny"


def test_key_set_and_metadata(sd1_run, tiny_sd1_dir):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    settings, _, _, out = sd1_run
    final = load_file(str(out / "out" / "tiny.safetensors"))
    unet_config = UNet2DConditionModel.load_config(tiny_sd1_dir, subfolder="unet")
    te_layers = CLIPTextConfig.from_pretrained(tiny_sd1_dir / "text_encoder").num_hidden_layers

    class Config(dict):
        __getattr__ = dict.get

    config = Config(unet_config)
    config.setdefault("transformer_layers_per_block", 1)
    assert module_names(final) == expected_unet_names(config, with_conv=False) | expected_te_names(te_layers)
    meta = metadata(out / "out" / "tiny.safetensors")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_output_name"] == "tiny" and meta["ss_steps"] == "8" and meta["ss_epoch"] == "4"
    assert meta["ss_num_train_images"] == "2" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"])["1_sks dog"]["sks dog"] == 2
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_sks dog": {"n_repeats": 1, "img_count": 2}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_tensorboard_logs(sd1_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, out = sd1_run
    (run_dir,) = list((out / "logs").iterdir())
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch", "lr/unet", "lr/textencoder"} <= tags
    assert len(acc.Scalars("loss/current")) == 8 and len(acc.Scalars("loss/epoch")) == 4


def test_trained_lora_loads_in_diffusers_and_changes_output(sd1_run, tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    _, _, _, out = sd1_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    pipe.load_lora_weights(str(out / "out" / "tiny.safetensors"))
    assert abs(render() - base).mean() > 1e-4


def test_stop_from_thread_then_resume_matches_uninterrupted(tiny_sd1_dir, images, tmp_path):
    common = dict(epoch=2, network_dropout=0.1, noise_offset=0.05, noise_offset_random_strength=True,
                  lr_scheduler="cosine", lr_warmup=25)
    straight = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "a", save_every_n_steps=1, save_last_n_steps=1,
                                   **common))
    assert straight.status == "finished" and straight.step == 4
    # step files every step, the last 1 step kept besides the newest; step 4 is the final file
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == [
        "tiny-step00000002.safetensors", "tiny-step00000003.safetensors", "tiny.safetensors",
    ]

    control, reached, stop_sent = Control(), threading.Event(), threading.Event()

    def sink(event):  # step 3 is mid-epoch 2; the stop comes from another thread
        if isinstance(event, ev.Step) and event.step == 3:
            reached.set()
            stop_sent.wait(10)
        recorder(event)

    def stopper():
        reached.wait(60)
        control.request_stop()
        stop_sent.set()

    recorder = Recorder()
    thread = threading.Thread(target=stopper)
    thread.start()
    stopped = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "b", save_state=True, **common), sink, control)
    thread.join()
    assert stopped.status == "stopped" and stopped.step == 3
    (stop_event,) = recorder.of(ev.Stopped)
    names = sorted(os.path.basename(f) for f in stop_event.files)
    assert names == ["tiny-step00000003-state", "tiny-step00000003.safetensors"]
    state = json.loads((tmp_path / "b" / "tiny-step00000003-state" / "train_state.json").read_text())
    assert (state["current_step"], state["epoch"], state["batches_done"]) == (3, 2, 1)

    resumed_events = Recorder()
    resumed = train(tiny_settings(tiny_sd1_dir, images, tmp_path / "c", resume=str(tmp_path / "b" / "tiny-step00000003-state"),
                                  **common), resumed_events)
    assert resumed.status == "finished" and resumed.step == 4
    assert resumed_events.of(ev.Started)[0].start_step == 3
    assert [s.step for s in resumed_events.of(ev.Step)] == [4]
    a = load_file(str(tmp_path / "a" / "tiny.safetensors"))
    c = load_file(str(tmp_path / "c" / "tiny.safetensors"))
    assert set(a) == set(c)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-5, atol=1e-6)


def test_sd2_single_file_unet_only_with_cached_text_encoder(tiny_sd2_file, tiny_sd2_dir, images, tmp_path):
    from diffusers import UNet2DConditionModel

    rec, control = Recorder(), Control()

    def sink(event):
        rec(event)
        if isinstance(event, ev.Step) and event.step == 1:
            control.request_save()  # the GUI's "save now"

    settings = tiny_settings(tiny_sd2_file, images, tmp_path, v2=True, text_encoder_lr=0, cache_latents=False)
    result = train(settings, sink, control)
    assert result.status == "finished", result.error
    assert (tmp_path / "tiny-step00000001.safetensors").is_file()
    final = load_file(str(tmp_path / "tiny.safetensors"))
    config = UNet2DConditionModel.load_config(tiny_sd2_dir, subfolder="unet")
    config = type("C", (dict,), {"__getattr__": dict.get})(config)
    config.setdefault("transformer_layers_per_block", 1)
    assert module_names(final) == expected_unet_names(config, with_conv=False)  # no lora_te_ keys
    meta = metadata(tmp_path / "tiny.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert "text encoder outputs cached" in rec.logs()


def test_sd2_v_prediction_long_captions(tiny_sd2v_dir, images, tmp_path):
    rec = Recorder()
    settings = tiny_settings(tiny_sd2v_dir, images, tmp_path, v2=True, v_parameterization=True, xformers="xformers",
                             max_token_length=150, clip_skip=2, min_snr_gamma=5, scale_v_pred_loss_like_noise_pred=True)
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert "xformers is not usable here" in rec.logs() and "SDPA" in rec.logs()  # CPU: clear message, SDPA
    meta = metadata(tmp_path / "tiny.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in rec.of(ev.Step))


def test_many_options_together(tiny_sd1_file, images, tmp_path):
    """LoCon, checkpointing, accumulation, 8-bit optimizer, noise options, disk cache, long captions."""
    local_images = tmp_path / "img"
    shutil.copytree(images, local_images)
    rec = Recorder()
    settings = tiny_settings(
        tiny_sd1_file, local_images, tmp_path / "out", LoRA_type="Kohya LoCon", conv_dim=2, conv_alpha=1,
        gradient_checkpointing=True, gradient_accumulation_steps=2, train_batch_size=1, epoch=2,
        optimizer="AdamW8bit", lr_scheduler="cosine", lr_warmup=50, min_snr_gamma=5, noise_offset=0.1,
        adaptive_noise_scale=0.01, ip_noise_gamma=0.05, loss_type="huber", scale_weight_norms=1.0,
        network_dropout=0.1, rank_dropout=0.1, module_dropout=0.1, flip_aug=True, cache_latents_to_disk=True,
        max_token_length=150, clip_skip=2, save_model_as="safetensors",
    )
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert [s.step for s in rec.of(ev.Step)] == [1, 2]  # 4 batches / accumulation 2
    assert list(local_images.rglob("*_sd.npz"))  # latents cached next to the images
    final = load_file(str(tmp_path / "out" / "tiny.safetensors"))
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in final
    assert final["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    te_up = [v for k, v in final.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    conv_up = final["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert any(v.abs().sum() > 0 for v in te_up) and conv_up.abs().sum() > 0  # gradients reached both
    assert json.loads(metadata(tmp_path / "out" / "tiny.safetensors")["ss_network_args"])["conv_dim"] == "2"


def test_adafactor_relative_step_with_warmup_runs(tiny_sd1_dir, images, tmp_path):
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, optimizer="Adafactor", lr_scheduler="cosine",
                             lr_warmup=10, save_model_as="ckpt")
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert "relative_step" in rec.logs()
    assert torch.load(tmp_path / "tiny.ckpt", weights_only=True)  # save_model_as ckpt: a torch-saved state dict


def test_continue_from_network_weights_with_their_dims(sd1_run, tiny_sd1_dir, images, tmp_path):
    _, _, _, out = sd1_run
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, network_weights=str(out / "out" / "tiny.safetensors"),
                             dim_from_weights=True, network_dim=16)
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert "continuing from" in rec.logs()
    final = load_file(str(tmp_path / "tiny.safetensors"))
    assert {v.shape[0] for k, v in final.items() if k.endswith("lora_down.weight")} == {4}


@pytest.mark.parametrize("overrides, field", [
    ({"LoRA_type": "Kohya LoHa"}, "LoRA_type"),
    ({"train_data_dir": "/nonexistent/images"}, "train_data_dir"),
    ({"optimizer": "NoSuchOptimizer"}, "optimizer"),
])
def test_bad_settings_fail_with_an_error_event(tiny_sd1_dir, images, tmp_path, overrides, field):
    rec = Recorder()
    result = train(tiny_settings(tiny_sd1_dir, images, tmp_path, **overrides), rec)
    assert result.status == "failed" and result.field == field
    (error,) = rec.of(ev.Error)
    assert error.field == field and error.message
    assert not rec.of(ev.Started)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_policy(tiny_sd1_dir, images, tmp_path, monkeypatch, policy):
    import trainer.loop

    real = trainer.loop.training_loss
    calls = {"n": 0}

    def nan_on_third(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer.loop, "training_loss", nan_on_third)
    rec = Recorder()
    result = train(tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=2, nan_loss_policy=policy), rec)
    if policy == "skip":
        assert result.status == "finished" and result.step == 3  # 4 batches, one update dropped
        assert "skipped" in rec.logs()
    else:
        assert result.status == "failed" and result.field == "nan_loss_policy"
        assert [os.path.basename(f) for f in result.files] == ["tiny-step00000002.safetensors"]  # kept what it had
        assert "NaN" in rec.of(ev.Error)[0].message


def test_out_of_memory_mid_run_saves_what_exists_and_says_what_to_change(tiny_sd1_dir, images, tmp_path, monkeypatch):
    import trainer.loop

    real = trainer.loop.training_loss
    calls = {"n": 0}

    def oom_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "training_loss", oom_on_third)
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, epoch=2, gradient_checkpointing=False)
    result = train(settings, rec)
    assert result.status == "failed" and result.field == "train_batch_size"
    assert [os.path.basename(f) for f in result.files] == ["tiny-step00000002.safetensors"]  # the steps done are kept
    assert os.path.exists(result.files[0])
    error = rec.of(ev.Error)[0]
    assert "out of GPU memory" in error.message
    assert "gradient checkpointing" in error.hint.lower()  # advice fits the settings: it is off here


def test_dynamo_backend_compiles_the_unet(tiny_sd1_dir, images, tmp_path):
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, dynamo_backend="eager", text_encoder_lr=0)
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert "UNet compiled with torch.compile (backend eager)" in rec.logs()
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in rec.of(ev.Step))
    assert os.path.exists(result.files[-1])


def test_bf16_trains_on_a_cpu_with_bf16_instructions(tiny_sd1_dir, images, tmp_path, monkeypatch):
    # bf16 autocast runs on any CPU; the trainer only chooses it where the CPU has bf16 instructions
    from trainer.preflight import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    rec = Recorder()
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path, mixed_precision="bf16", full_bf16=True,
                             save_precision="bf16", epoch=3)
    result = train(settings, rec)
    assert result.status == "finished", result.error
    assert "mixed precision bf16 on cpu: frozen weights bfloat16, LoRA weights bfloat16" in rec.logs()
    assert "instructions" not in rec.logs()  # no note: it runs what was asked for
    losses = [s.loss for s in rec.of(ev.Step)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    lora = load_file(result.files[-1])
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}
    assert any(t.float().abs().sum() > 0 for k, t in lora.items() if "lora_up" in k)  # trained (up starts at 0)
