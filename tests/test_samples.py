"""Sample images during training: when, file names, events, Sample now, and training left untouched."""
from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_train import Recorder, tiny_settings
from trainer import events as ev
from trainer.control import Control
from trainer.inference.keep_state import training_state_kept
from trainer.loop import train

pytestmark = pytest.mark.slow  # trains and samples tiny models

PROMPTS = ("a photo of sks dog --w 64 --h 64 --s 2 --d 5\n# a comment\n\n"
           "sks dog running --n blurry --w 72 --h 64 --s 2 --ss dpmsolver++")
STAMP = r"\d{14}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from trainer.devtools.synthetic import make_image_folder

    folder = tmp_path_factory.mktemp("sample_images") / "img"
    return make_image_folder(folder, {"1_sks dog": 2}, sizes=[(64, 64)], seed=3)


def run(model, images, out, control=None, sink=None, **overrides):
    """2 epochs x 2 steps; dropout on, so a disturbed RNG or a module left in eval mode changes the result."""
    settings = tiny_settings(model, images, out, epoch=2, network_dropout=0.2, **overrides)
    recorder = sink or Recorder()
    result = train(settings, recorder, control)
    assert result.status == "finished", result.error
    return recorder


def sample_names(out) -> list[str]:
    return sorted(p.name for p in (out / "sample").iterdir())


@pytest.fixture(scope="module")
def epoch_run(tiny_sd1_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("epoch_samples")
    recorder = run(tiny_sd1_dir, images, out, sample_every_n_epochs=1, sample_at_first=True, sample_prompts=PROMPTS,
                   sample_every_n_steps=1)  # epochs win over steps, as in sd-scripts
    return out, recorder


def test_every_n_epochs_and_at_first_kohya_names(epoch_run):
    out, recorder = epoch_run
    names = sample_names(out)
    expected = [rf"tiny_e00000{e}_00_{STAMP}_5\.png" for e in (0, 1, 2)]  # --d 5: seed in the name
    expected += [rf"tiny_e00000{e}_01_{STAMP}\.png" for e in (0, 1, 2)]
    assert len(names) == 6
    for pattern in expected:
        assert sum(bool(re.fullmatch(pattern, n)) for n in names) == 1, (pattern, names)
    sizes = {Image.open(out / "sample" / n).size for n in names}
    assert sizes == {(64, 64), (72, 64)}  # --w 72 is a multiple of 8: kept


def test_sample_events_carry_path_prompt_step_epoch(epoch_run):
    out, recorder = epoch_run
    samples = recorder.of(ev.Sample)
    assert [(s.prompt, s.step, s.epoch) for s in samples] == [
        ("a photo of sks dog", 0, 0), ("sks dog running", 0, 0), ("a photo of sks dog", 2, 1),
        ("sks dog running", 2, 1), ("a photo of sks dog", 4, 2), ("sks dog running", 4, 2)]
    assert all(str(out / "sample") in s.path for s in samples)
    kinds = [type(e).__name__ for e in recorder.events if not isinstance(e, ev.Log)]
    assert kinds.index("Sample") > kinds.index("Started") and kinds[-1] == "Finished"


def test_samples_have_content_and_fixed_seeds_repeat(epoch_run):
    out, _ = epoch_run
    names = sample_names(out)
    first = np.asarray(Image.open(out / "sample" / next(n for n in names if n.startswith("tiny_e000000_00"))))
    assert first.std() > 1  # an image, not a flat fill
    assert "Seed: 5" in Image.open(out / "sample" / names[0]).text["parameters"]


def test_sampling_leaves_training_identical(epoch_run, tiny_sd1_dir, images, tmp_path):
    out, _ = epoch_run
    run(tiny_sd1_dir, images, tmp_path)
    assert not (tmp_path / "sample").exists()
    sampled, plain = load_file(str(out / "tiny.safetensors")), load_file(str(tmp_path / "tiny.safetensors"))
    assert sampled.keys() == plain.keys()
    for key in plain:
        assert torch.equal(sampled[key], plain[key]), key


def test_every_n_steps_names_and_sample_now_from_another_thread(tiny_sd1_dir, images, tmp_path):
    control = Control()
    recorder = Recorder()

    def sink(event):
        recorder(event)
        if isinstance(event, ev.Step) and event.step == 1:  # the GUI's button: another thread
            clicker = threading.Thread(target=control.request_sample)
            clicker.start()
            clicker.join()

    run(tiny_sd1_dir, images, tmp_path, control=control, sink=sink, sample_every_n_steps=2,
        sample_prompts="sks dog --w 64 --h 64 --s 2")
    names = sample_names(tmp_path)
    assert [n[:len("tiny_000000_00")] for n in names] == ["tiny_000001_00", "tiny_000002_00", "tiny_000004_00"]
    assert all(re.fullmatch(rf"tiny_\d{{6}}_00_{STAMP}\.png", n) for n in names)  # no --d: no seed suffix
    assert [(s.step, s.epoch) for s in recorder.of(ev.Sample)] == [(1, 1), (2, 1), (4, 2)]


def sampler_schedule(**settings):
    """A TrainingSamples whose image making is recorded instead of run: (step, epoch, name_epoch) per set."""
    from types import SimpleNamespace

    from trainer.inference.training_samples import TrainingSamples
    from trainer.settings import TrainingSettings

    recorder = Recorder()
    samples = TrainingSamples(TrainingSettings(**settings), SimpleNamespace(), torch.nn.Linear(1, 1),
                              torch.device("cpu"), None, recorder)
    made = []
    samples._one = lambda prompt, step, epoch, name_epoch: made.append((step, epoch, name_epoch, prompt.index))
    samples._eval_roots = samples._needed = lambda: []
    return samples, made, recorder


def test_epochs_win_over_steps_and_one_set_per_step():
    samples, made, _ = sampler_schedule(sample_every_n_epochs=2, sample_every_n_steps=1, sample_prompts="a")
    for step, epoch in [(1, 1), (2, 1)]:
        samples.after_step(step, epoch)
    samples.after_epoch(1, 2)
    samples.after_step(3, 2, requested=True)  # Sample now still works
    samples.after_step(4, 2)
    samples.after_epoch(2, 4, requested=True)  # the epoch set answers the request too
    assert made == [(3, 2, None, 0), (4, 2, 2, 0)]

    samples, made, _ = sampler_schedule(sample_every_n_steps=2, sample_prompts="a\nb")
    for step in (1, 2, 3):
        samples.after_step(step, 1)
    samples.after_epoch(1, 3, requested=True)
    samples.after_epoch(1, 3, requested=True)  # nothing new since the last set at this step
    assert made == [(2, 1, None, 0), (2, 1, None, 1), (3, 1, None, 0), (3, 1, None, 1)]


def test_sample_now_without_prompts_warns_once():
    samples, made, recorder = sampler_schedule()
    samples.before_training(0)  # sample_at_first is off
    samples.after_step(1, 1, requested=True)
    samples.after_step(2, 1, requested=True)
    assert made == [] and recorder.logs().count("Sample prompts is empty") == 1


def test_unknown_sampler_falls_back_with_a_warning():
    samples, made, recorder = sampler_schedule(sample_at_first=True, sample_prompts="a --ss warp9\nb --ss K_LMS")
    assert [p.sampler for p in samples.prompts] == ["euler_a", "lms"]
    assert "unknown sampler 'warp9'" in recorder.logs()
    samples.before_training(0)
    assert made == [(0, 0, 0, 0), (0, 0, 0, 1)]


@pytest.mark.parametrize("fixture", ["tiny_sd2v_dir", "tiny_sdxl_dir"])
def test_v_prediction_and_sdxl_runs_sample(fixture, images, tmp_path, request):
    model = request.getfixturevalue(fixture)
    settings = tiny_settings(model, images, tmp_path, sample_at_first=True, sample_every_n_epochs=1,
                             sample_prompts="sks dog --w 64 --h 64 --s 2 --d 1 --ss euler", text_encoder_lr=0,
                             v_parameterization=fixture == "tiny_sd2v_dir", v2=fixture == "tiny_sd2v_dir",
                             sdxl=fixture == "tiny_sdxl_dir")
    recorder = Recorder()
    result = train(settings, recorder)  # text encoder not trained: its outputs are cached and it is released
    assert result.status == "finished", result.error
    assert [s.step for s in recorder.of(ev.Sample)] == [0, 2]
    before, after = (np.asarray(Image.open(s.path), dtype=float) for s in recorder.of(ev.Sample))
    assert before.std() > 1 and np.abs(before - after).mean() > 0  # the LoRA changed the samples


def test_kept_state_restores_modes_even_on_failure_and_leaves_the_global_rngs_alone():
    """Sampling puts module modes back; it does not wind the global RNGs back (that would undo other threads'
    draws; the run does not draw from them: test_sampling_leaves_training_identical)."""
    root = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    root.train()
    root[1].eval()  # mixed modes come back as they were, module by module
    torch.manual_seed(3)
    inside = None
    with pytest.raises(RuntimeError):
        with training_state_kept([root], [root], torch.device("cpu")):
            assert not root.training and not root[0].training and not torch.is_grad_enabled()
            torch.rand(3)  # another thread's draw
            inside = torch.get_rng_state()
            raise RuntimeError("sampling failed")
    assert torch.equal(torch.get_rng_state(), inside)
    assert root.training and root[0].training and not root[1].training and torch.is_grad_enabled()


class _RecordedMoves(torch.nn.Linear):
    """A model whose ``to(device)`` is recorded, not done (there is no GPU in the tests)."""

    def __init__(self, device: str = "cpu"):
        super().__init__(2, 2, device=device)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return self


def test_models_parked_on_the_cpu_come_to_the_device_and_go_back():
    released_vae, on_device = _RecordedMoves(), _RecordedMoves("meta")  # meta: the training device here
    with training_state_kept([], [released_vae, on_device], torch.device("meta")):
        assert released_vae.moves == ["meta"]
    assert released_vae.moves == ["meta", "cpu"] and on_device.moves == []
