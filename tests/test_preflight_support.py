"""Shared builders for the preflight tests (no tests here): a valid run in a temp folder, a fixed device."""
from __future__ import annotations

import pickle
from pathlib import Path

from trainer.devtools.synthetic import make_image_folder
from trainer.preflight.device import GIB, DeviceInfo


def big_cpu() -> DeviceInfo:
    return DeviceInfo("cpu", "test CPU", 256 * GIB, 256 * GIB, "test")


def gpu(total_gib: float, name: str = "test GPU") -> DeviceInfo:
    return DeviceInfo("cuda", name, int(total_gib * GIB), int(total_gib * GIB), "test")


def valid_config(tmp_path: Path, model_path, **overrides) -> dict:
    """Settings (as a kohya JSON dict) of a run that passes preflight with no error and no warning."""
    images = tmp_path / "img"
    if not images.exists():
        make_image_folder(images, {"10_sks dog": 3, "5_cat": 2}, sizes=[(64, 64), (96, 64), (64, 96)], seed=0)
    config = {
        "pretrained_model_name_or_path": str(model_path),
        "train_data_dir": str(images),
        "output_dir": str(tmp_path / "out"),
        "output_name": "my_lora",
        "max_resolution": "128,128",
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "optimizer": "AdamW",
        "lr_scheduler": "constant",
        "lr_warmup": 0,
        "mixed_precision": "no",
        "xformers": "sdpa",
    }
    config.update(overrides)
    return config


def settings(tmp_path: Path, model_path, **overrides):
    from trainer.settings import TrainingSettings

    return TrainingSettings(**valid_config(tmp_path, model_path, **overrides))


def write_hostile_pickle(path: Path, marker: Path) -> Path:
    """A .ckpt whose unpickling would create ``marker`` (what a malicious model file could do)."""

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": Hostile()}}))
    return path


def problems(report, severity=None, field=None):
    return [p for p in report.problems if (severity is None or p.severity == severity) and (field is None or p.field == field)]


def write_huge_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid PNG header announcing ``width`` x ``height`` 1-bit pixels, written without allocating them."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path
