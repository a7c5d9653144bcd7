"""Runtime guards: atomic saves (disk full keeps the old file), OOM advice, NaN guard, bad-image policy."""
from __future__ import annotations

import errno
import os

import pytest

from trainer import safety
from trainer.safety import BadImagePolicy, NanGuard, SaveError, atomic_write, atomic_write_bytes
from trainer.settings import TrainingSettings


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- atomic_write -------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "lora.safetensors"
    atomic_write_bytes(target, b"first")
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"second"))
    assert target.read_bytes() == b"second" and leftovers(target.parent) == []


def test_disk_full_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous good file")

    def write_half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SaveError) as caught:
        atomic_write(target, write_half_then_fail)
    err = caught.value
    assert target.read_bytes() == b"previous good file" and leftovers(tmp_path) == []
    assert err.disk_full and err.previous_intact and err.errno == errno.ENOSPC
    text = str(err)
    assert "previous lora.safetensors is intact" in text and "No space left" in text
    assert f"The disk holding {tmp_path} has " in text and "iB free: free some space" in text


def test_disk_full_on_fsync_and_without_a_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "new.safetensors"

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safety.os, "fsync", failing_fsync)
    with pytest.raises(SaveError) as caught:
        atomic_write_bytes(target, b"data")
    assert not target.exists() and leftovers(tmp_path) == []
    assert "no file was written" in str(caught.value) and not caught.value.previous_intact


def test_other_errors_are_save_errors_too(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def bad_writer(tmp):
        raise ValueError("tensor is not contiguous")

    with pytest.raises(SaveError) as caught:
        atomic_write(target, bad_writer)
    assert "tensor is not contiguous" in str(caught.value) and not caught.value.disk_full
    assert target.read_bytes() == b"old"


def test_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SaveError) as caught:
        atomic_write_bytes(blocker / "out.safetensors", b"x")
    assert "no file was written" in str(caught.value)


def test_disk_full_without_errno_as_safetensors_reports_it(tmp_path):
    from safetensors import SafetensorError

    def rust_error(tmp):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    with pytest.raises(SaveError) as caught:
        atomic_write(tmp_path / "x.safetensors", rust_error)
    assert caught.value.disk_full and caught.value.errno == errno.ENOSPC
    assert f"The disk holding {tmp_path} has " in str(caught.value) and " free: free some space" in str(caught.value)
    assert not safety.is_disk_full(ValueError("tensor is not contiguous"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    from safetensors.torch import save_file
    import torch

    previous = os.umask(umask)
    try:  # safetensors' save_file replaces the temp file with its own 0600 one
        atomic_write(tmp_path / "a.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in sorted(tmp_path.iterdir())] == [mode, mode]


def test_free_bytes_of_a_missing_path_uses_the_parent(tmp_path):
    assert safety.free_bytes(tmp_path / "a" / "b") == safety.free_bytes(tmp_path) > 0


# ---- out of memory ----------------------------------------------------------------------------

def test_is_out_of_memory():
    import torch

    assert safety.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert safety.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert safety.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert safety.is_out_of_memory(MemoryError())
    assert not safety.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not safety.is_out_of_memory(ValueError("out of memory"))


# ---- NaN guard ---------------------------------------------------------------------------------

def test_nan_guard_stop_policy_names_the_step_and_hints():
    s = TrainingSettings(mixed_precision="fp16", unet_lr=1e-3, text_encoder_lr=1e-4, network_alpha=16, network_dim=8)
    guard = NanGuard("stop", settings=s)
    assert guard.check(0.12, step=1).action == "ok"
    decision = guard.check(float("nan"), step=2)
    assert decision.action == "stop" and "step 2" in decision.message and "NaN" in decision.message
    for hint in ("lower the learning rate (now 0.001", "Network Alpha (16)", "bf16 instead of fp16"):
        assert hint in decision.message


def test_nan_guard_skip_policy_skips_until_too_many_in_a_row():
    import torch

    guard = NanGuard("skip", max_consecutive=3)
    assert guard.check(torch.tensor(float("inf")), step=5).action == "skip"
    assert guard.check(1.0, step=6).action == "ok"  # a good step resets the count
    decisions = [guard.check(float("nan"), step=n) for n in (7, 8, 9)]
    assert [d.action for d in decisions] == ["skip", "skip", "stop"]
    assert guard.skipped_steps == [5, 7, 8]
    assert "step 9" in decisions[-1].message and "3 steps in a row" in decisions[-1].message


def test_nan_hint_for_sdxl_fp16_vae_and_defaults():
    sdxl = TrainingSettings(sdxl=True, mixed_precision="fp16", sdxl_no_half_vae=False)
    assert "No half VAE" in safety.nan_hint(sdxl)
    calm = TrainingSettings(mixed_precision="bf16", unet_lr=1e-4, text_encoder_lr=5e-5, network_alpha=1)
    assert "check the images" in safety.nan_hint(calm)
    with pytest.raises(ValueError):
        NanGuard("ignore")


# ---- bad images ---------------------------------------------------------------------------------

def test_bad_image_policy_skip_and_stop(tmp_path):
    from trainer.data.images import BadImageError

    path = tmp_path / "10_dog" / "broken.png"
    skip = BadImagePolicy("skip")
    decision = skip.handle(path, BadImageError(path, "cannot decode image: truncated"))
    assert decision.action == "skip" and "broken.png" in decision.message and "truncated" in decision.message
    assert skip.should_skip(path) and "broken.png" in skip.summary()
    stop = BadImagePolicy("stop").handle(path, OSError("bad data"))
    assert stop.action == "stop" and str(path) in stop.message and "skip" in stop.message
    assert BadImagePolicy("stop").summary() == ""
    with pytest.raises(ValueError):
        BadImagePolicy("maybe")


def test_save_error_is_an_oserror():
    assert issubclass(SaveError, OSError)
    err = SaveError("msg", path="p", previous_intact=True, free_bytes=0, cause_errno=errno.ENOSPC)
    assert str(err) == "msg" and err.disk_full and isinstance(err.free_bytes, int)
    assert os.strerror(errno.ENOSPC)  # the errno we simulate is a real one
