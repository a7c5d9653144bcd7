"""Weights & Biases logs of a run (``log_with`` = "wandb" or "all"), offline unless asked otherwise.

The same scalars as the TensorBoard log (``trainer.tb_log``): ``loss/current``, ``loss/average`` and
``lr/<group>`` per step, ``loss/epoch`` per epoch (charted against ``epoch``), and the run's sample
images as ``samples``. kohya_ss's keys: ``log_tracker_name`` is the W&B project (sd-scripts' default
"network_train"), ``wandb_run_name`` the run's name (empty: the output name, as kohya_ss passes it),
``log_tracker_config`` a TOML file whose ``[wandb]`` table adds ``wandb.init`` arguments (as sd-scripts'
``--log_tracker_config``; its values win over the name), ``wandb_api_key`` the key for an online run.

Offline by default: the run is written to ``<run folder>/wandb/offline-run-<time>-<id>`` (the run folder is
``<logging_dir>/<output_name><YYYYmmddHHMMSS>``, which the TensorBoard log shares, or under
``<output_dir>/log`` when no Logging folder is set) and ``wandb sync <that folder>`` uploads it later.
It goes online only when asked explicitly (``WANDB_MODE=online`` in the environment, or
``mode = "online"`` in the tracker config's ``[wandb]`` table) AND an API key is there (``wandb_api_key``
or ``WANDB_API_KEY``); asked without a key it stays offline, and the check says so. wandb's own usage
analytics and error reports are turned off in every mode.

Torch-free; ``wandb`` is imported only when a run opens this log (the ``logging`` extra installs it).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.problems import NekoyaError

DEFAULT_PROJECT = "network_train"  # sd-scripts' tracker name when log_tracker_name is empty
INSTALL_COMMAND = f"{sys.executable} -m pip install 'wandb>=0.31'"  # the logging extra's requirement


class TrackerConfigError(NekoyaError, ValueError):
    """log_tracker_config cannot be used; the message names the file and what is wrong."""

    field = "log_tracker_config"
    fix = "point log_tracker_config at a TOML file with a [wandb] table of wandb.init arguments, or empty it"

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


def uses_wandb(log_with: str) -> bool:
    return (log_with or "").strip().lower() in ("wandb", "all")


def tracker_value(settings: Any, key: str) -> str:
    """A logging key's value as text: a declared setting, or the kohya_ss key kept from the config file."""
    value = getattr(settings, key, None)
    if value is None:
        kept = settings.kept_kohya_values() if hasattr(settings, "kept_kohya_values") else {}
        value = kept.get(key)
    if value is None or value is False:
        return ""
    return str(value).strip()


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def read_tracker_config(path: str) -> dict[str, Any]:
    """The ``[wandb]`` table of a log_tracker_config TOML file ({} when it has none). Raises TrackerConfigError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TrackerConfigError(f"the tracker config file {path} does not exist" if not file.exists()
                                 else f"{path} is a folder, not a TOML file", path)
    try:
        data = _read_toml(file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise TrackerConfigError(f"the tracker config file {path} is not valid TOML ({exc})", path) from None
    table = data.get("wandb", {})
    if not isinstance(table, dict):
        raise TrackerConfigError(f"the tracker config file {path}: wandb must be a table ([wandb]), "
                                 f"not {type(table).__name__}", path)
    return table


def unknown_init_keys(table: dict[str, Any]) -> list[str]:
    """Keys of a ``[wandb]`` table that ``wandb.init`` does not take (imports wandb)."""
    import inspect

    import wandb

    accepted = set(inspect.signature(wandb.init).parameters)
    return sorted(k for k in table if k not in accepted)


@dataclass(frozen=True)
class WandbPlan:
    """What a run's W&B log does: where it goes, in which mode, under which names; decided before loading."""

    project: str
    name: str
    mode: str  # "offline", "online" or "disabled"
    init_args: dict  # the tracker config's [wandb] table, less mode
    api_key: str
    asked_online_without_key: bool = False

    @classmethod
    def of(cls, settings: Any, environ: dict | None = None) -> "WandbPlan":
        env = os.environ if environ is None else environ
        table = dict(read_tracker_config(tracker_value(settings, "log_tracker_config"))
                     if tracker_value(settings, "log_tracker_config") else {})
        asked = str(table.pop("mode", "") or env.get("WANDB_MODE", "") or "offline").strip().lower()
        key = tracker_value(settings, "wandb_api_key") or env.get("WANDB_API_KEY", "").strip()
        mode = asked if asked in ("offline", "disabled") else "online" if asked == "online" and key else "offline"
        return cls(project=tracker_value(settings, "log_tracker_name") or DEFAULT_PROJECT,
                   name=tracker_value(settings, "wandb_run_name") or settings.output_name,
                   mode=mode, init_args=table, api_key=key if mode == "online" else "",
                   asked_online_without_key=asked == "online" and not key)


def log_base(settings: Any) -> str:
    """The folder the W&B run folder goes under: the Logging folder, or ``<Output folder>/log``."""
    return settings.logging_dir or os.path.join(settings.output_dir or ".", "log")


class WandbLog:
    """One run's W&B log. ``folder`` is the run folder given to wandb as ``dir``."""

    def __init__(self, settings: Any, folder: str, plan: WandbPlan | None = None) -> None:
        import wandb

        self.plan = plan = plan or WandbPlan.of(settings)
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        _no_analytics()
        # The process-wide mode first: wandb decides on its own background traffic from it, not from the run's.
        wandb.setup(wandb.Settings(mode=plan.mode))
        init_args = dict(plan.init_args)
        # console off: the GUI's own stdout is never wrapped; offline, no system monitor (it probes cloud hosts)
        chosen = {"console": "off", "silent": True, **({} if plan.mode == "online" else
                                                        {"x_disable_stats": True, "x_disable_machine_info": True}),
                  **({"api_key": plan.api_key} if plan.api_key else {}), **dict(init_args.pop("settings", None) or {})}
        known = getattr(wandb.Settings, "model_fields", None)  # an older wandb lacks some switches: leave them out
        chosen = {k: v for k, v in chosen.items() if known is None or k in known or not k.startswith("x_")}
        args = {"project": plan.project, "name": plan.name, "dir": folder, **init_args, "mode": plan.mode,
                "settings": wandb.Settings(**chosen)}
        self.run = wandb.init(**args)
        self.run.define_metric("epoch", hidden=True)
        self.run.define_metric("loss/epoch", step_metric="epoch")
        self._wandb = wandb
        self._step = 0
        self._samples = _SampleWatch(Path(settings.output_dir or ".") / "sample")

    @property
    def run_folder(self) -> str:
        """The offline (or online) run's own folder: ``<folder>/wandb/offline-run-<time>-<id>``."""
        return str(Path(self.run.dir).parent)

    def step(self, step: int, loss: float, avg_loss: float, lrs: dict[str, float]) -> None:
        self._step = step
        row = {"loss/current": loss, "loss/average": avg_loss, **{f"lr/{name}": lr for name, lr in lrs.items()}}
        row.update(self._new_samples())
        self.run.log(row, step=step)

    def epoch(self, epoch: int, avg_loss: float) -> None:
        self.run.log({"loss/epoch": avg_loss, "epoch": epoch, **self._new_samples()}, step=self._step)

    def close(self) -> None:
        samples = self._new_samples()
        if samples:
            self.run.log(samples, step=self._step)
        self.run.finish()
        # Stop wandb's service process: its run file is then whole on disk (finish() may return before), and
        # a GUI that trains again starts a fresh one in the mode of that run.
        self._wandb.teardown()

    def _new_samples(self) -> dict:
        paths = self._samples.new()
        if not paths:
            return {}
        return {"samples": [self._wandb.Image(str(p), caption=p.stem) for p in paths]}


class _SampleWatch:
    """The sample images written since the run began (``<output_dir>/sample``): one stat per call while
    the folder is unchanged, so it costs nothing per step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen = set(self._pngs())
        self.mtime = self._mtime()

    def new(self) -> list[Path]:
        mtime = self._mtime()
        if mtime == self.mtime:
            return []
        self.mtime = mtime
        fresh = [p for p in self._pngs() if p not in self.seen]
        self.seen.update(fresh)
        return sorted(fresh)

    def _mtime(self) -> float | None:
        try:
            return self.folder.stat().st_mtime_ns
        except OSError:
            return None

    def _pngs(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
        except OSError:
            return []


def _no_analytics() -> None:
    """Turn off wandb's usage analytics for this process (a private switch: best effort on other versions)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):
        pass


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)
    with open(path, "rb") as f:
        return tomllib.load(f)
