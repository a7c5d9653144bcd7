"""Logging checks: what ``log_with`` writes and where, and every problem of the W&B log before loading.

wandb not installed (the command that installs it), a ``log_tracker_config`` that is missing, not TOML
or has keys ``wandb.init`` does not take (an error naming the field), TensorBoard asked for without a
Logging folder, and where the W&B run goes: offline (and how to upload it) or online.
"""
from __future__ import annotations

from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem
from trainer.wandb_log import (INSTALL_COMMAND, TrackerConfigError, WandbPlan, log_base, read_tracker_config,
                               tracker_value, unknown_init_keys, uses_wandb, wandb_installed)


@preflight_check("output.tensorboard_log")
def check_tensorboard(ctx: CheckContext):
    s = ctx.settings
    if s.log_with in ("tensorboard", "all") and not s.logging_dir:
        yield Problem("warning", "logging_dir", f'log_with = "{s.log_with}" writes no TensorBoard logs without a '
                      "Logging folder", fix="set the Logging folder (Folders tab)")


@preflight_check("output.wandb_log")
def check_wandb(ctx: CheckContext):
    s = ctx.settings
    config_path = tracker_value(s, "log_tracker_config")
    if not uses_wandb(s.log_with):
        if config_path:
            yield Problem("note", "log_tracker_config", "the tracker config is read only for a W&B log "
                          '(log_with = "wandb" or "all"); TensorBoard takes no arguments from it')
        return
    if not wandb_installed():
        yield Problem("error", "log_with", f'log_with = "{s.log_with}" needs the wandb package, which is not installed',
                      fix=f"install it with: {INSTALL_COMMAND} (or choose tensorboard)")
        return
    if config_path:
        try:
            table = read_tracker_config(config_path)
        except TrackerConfigError as exc:
            yield exc.problem()
            return
        unknown = unknown_init_keys(table) if ctx.deep else []  # imports wandb: the full check only
        if unknown:
            yield Problem("error", "log_tracker_config", f"the tracker config file {config_path}: wandb.init takes no "
                          f"{', '.join(unknown)}", fix="remove them from its [wandb] table", file=config_path)
            return
    plan = WandbPlan.of(s)
    where = f"{log_base(s)}/{getattr(s, 'log_prefix', '') or s.output_name}<time>/wandb"
    if plan.asked_online_without_key:
        yield Problem("warning", "wandb_api_key", "W&B online mode was asked for, but there is no API key: the run is "
                      f"written offline to {where}", fix="set wandb_api_key (or WANDB_API_KEY) to log online")
    elif plan.mode == "offline":
        upload = " (wandb_api_key is only used online)" if tracker_value(s, "wandb_api_key") else ""
        yield Problem("note", "log_with", f"the W&B run '{plan.name}' (project {plan.project}) is written offline to "
                      f"{where}{upload}; upload it later with: wandb sync <its offline-run folder>",
                      fix='to log online, set WANDB_MODE=online or mode = "online" in the tracker config\'s [wandb] '
                          "table, with an API key")
    elif plan.mode == "online":
        yield Problem("note", "log_with", f"the W&B run '{plan.name}' (project {plan.project}) is logged online, "
                      f"and kept in {where}")
