"""Optimizer, scheduler and learning-rate rules, reported before training instead of crashing in it.

The rules live once in ``trainer.optim.rules`` and the names in ``trainer.optim.table``;
preflight reports their decisions (the run plan then follows them, saying nothing again)
and adds the ones that would fail later. Rules with one obvious meaning are
applied for the user: a note says what changed and ``PreflightReport.adjusted``
applies it. Rules where the intent is unclear are refused, naming the field.

* Adafactor without ``relative_step`` runs with ``relative_step=True`` (the
  default of transformers and sd-scripts; ``warmup_init=True`` forces it too).
  It then sets its own step size: the LR Scheduler becomes ``adafactor`` and LR
  warmup becomes 0 (sd-scripts refuses warmup there: "adafactor does not require
  num_warmup_steps", kohya_ss #565/#617); Unet/TE rates are not used separately.
* The ``adafactor`` scheduler with Adafactor ``relative_step=False`` becomes
  ``constant`` (it crashes in sd-scripts with an IndexError, kohya_ss #1494/#2394).
  With another optimizer it cannot work at all: refused, naming ``lr_scheduler``.
* Warmup with a scheduler that has none (``constant``, ``piecewise_constant``):
  warmup becomes 0, as the kohya_ss GUI does when you pick ``constant`` (PR
  #2292); pick ``constant_with_warmup`` to warm up.
* Prodigy / DAdapt* multiply the step size they find by the learning rate, so it
  should be about 1: below 0.1 refused (1e-4 would train nothing). Different
  non-zero Unet/TE rates: the trainer uses the first group's (the Unet's) for all.
* ``True``/``False`` written in lower case in the extra arguments would be read as
  the (truthy) strings "true"/"false": refused.
* Every rate 0: refused. Rates outside the optimizer's usual range: warning.
"""
from __future__ import annotations

import importlib.util

from trainer.optim import SCHEDULERS, OptimConfigError, parse_literal_args
from trainer.optim import rules
from trainer.optim.lr_lambdas import IGNORES_OPTIONS, SCHEDULES, schedule_options
from trainer.optim import warmup_steps as trainer_warmup_steps
from trainer.optim.table import optimizer_facts, optimizer_kind
from trainer.preflight.registry import CheckContext, preflight_check
from trainer.preflight.report import Problem

WARMUP_FIELDS = ("lr_warmup", "lr_warmup_steps")
LOWERCASE_LITERALS = {"true": "True", "false": "False", "none": "None"}
RATE_FIX = "for a LoRA try 1e-4 (Unet) and 5e-5 (Text Encoder)"
ADAFACTOR_RECIPE = "to use your own schedule add relative_step=False scale_parameter=False warmup_init=False to Optimizer extra arguments"


def _optimizer_name(settings) -> str:
    return (settings.optimizer or "AdamW").strip()


def _kwargs(settings) -> dict:
    try:
        return parse_literal_args(settings.optimizer_args, "optimizer_args")
    except OptimConfigError:
        return {}  # reported by check_extra_args


def is_adafactor(settings) -> bool:
    return rules.is_adafactor(settings.optimizer)


def adafactor_relative_step(settings) -> bool:
    return rules.adafactor_relative_step(_kwargs(settings))


def effective_scheduler(settings) -> str:
    """The schedule the trainer will run (the Adafactor rules of trainer.optim.rules applied)."""
    return rules.effective_scheduler(settings.optimizer, _kwargs(settings), settings.lr_scheduler)


def with_optimizer_arg(text: str, key: str, value: str) -> str:
    """``text`` ("k=v k2=v2") with ``key`` set to ``value`` (replaced in place, or appended)."""
    tokens = text.split()
    if any(t.partition("=")[0] == key for t in tokens):
        return " ".join(f"{key}={value}" if t.partition("=")[0] == key else t for t in tokens)
    return " ".join(tokens + [f"{key}={value}"])


def _zero_warmup(settings) -> tuple[tuple[str, int], ...]:
    return tuple((key, 0) for key in WARMUP_FIELDS if getattr(settings, key))


def _warmup_field(settings) -> str:
    return "lr_warmup_steps" if settings.lr_warmup_steps > 0 else "lr_warmup"


@preflight_check("optimizer.extra_args")
def check_extra_args(ctx: CheckContext):
    for key in ("optimizer_args", "lr_scheduler_args"):
        try:
            values = parse_literal_args(getattr(ctx.settings, key), key)
        except OptimConfigError as exc:
            yield Problem("error", key, str(exc), fix="write key=value pairs separated by spaces, e.g. weight_decay=0.01")
            continue
        for name, value in values.items():
            if isinstance(value, str) and value.lower() in LOWERCASE_LITERALS:
                proper = LOWERCASE_LITERALS[value.lower()]
                yield Problem("error", key, f"{name}={value} would be read as the text '{value}', not {proper}",
                              fix=f"write {name}={proper} (capital letter, as in Python)")


@preflight_check("optimizer.scheduler_args")
def check_scheduler_args(ctx: CheckContext):
    """Options the chosen schedule does not take fail before any loading, not when the scheduler is built."""
    name = ctx.settings.lr_scheduler
    if name not in SCHEDULES or name in IGNORES_OPTIONS or (ctx.settings.lr_scheduler_type or "").strip():
        return
    try:
        values = parse_literal_args(ctx.settings.lr_scheduler_args, "lr_scheduler_args")
    except OptimConfigError:
        return  # reported by check_extra_args
    takes = schedule_options(name)
    unknown = sorted(set(values) - set(takes) - {"last_epoch"})
    if unknown:
        yield Problem("error", "lr_scheduler_args", f"the {name} scheduler has no option {', '.join(unknown)}",
                      fix=f"its options: {', '.join(takes) or 'none'}; remove the others")


@preflight_check("optimizer.package")
def check_optimizer_package(ctx: CheckContext):
    name = _optimizer_name(ctx.settings)
    kind = optimizer_kind(name)
    if kind is not None:
        module = kind.package.replace("-", "_")
        if module and _find_module(module) is None:
            yield Problem("error", "optimizer", f"{name} needs the Python package '{kind.package}', which is not installed",
                          fix=f"pip install {kind.package} (in Nekoya's environment), or choose AdamW")
        return
    module, _, cls_name = name.rpartition(".")
    if module and _find_module(module) is None:
        yield Problem("error", "optimizer", f"cannot find the module '{module}' of the optimizer {name!r}",
                      fix="check the spelling, or install the package that provides it")
    elif not module and not _is_torch_optimizer(cls_name):
        yield Problem("error", "optimizer", f"unknown optimizer {name!r}",
                      fix="choose one from the list, or give a class path such as bitsandbytes.optim.AdEMAMix8bit")


def _find_module(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that does not exist
        return None


def _is_torch_optimizer(name: str) -> bool:
    """A bare class name is looked up in torch.optim, as sd-scripts does (imports torch: rare path)."""
    import torch.optim

    return isinstance(getattr(torch.optim, name, None), type)


@preflight_check("optimizer.adafactor")
def check_adafactor(ctx: CheckContext):
    s = ctx.settings
    if not is_adafactor(s):
        return
    kwargs = _kwargs(s)
    if kwargs.get("warmup_init") and "relative_step" in kwargs and not kwargs["relative_step"]:
        yield Problem("note", "optimizer_args", "warmup_init=True needs relative_step=True, so relative_step is set to True",
                      fix="remove warmup_init=True to keep relative_step=False",
                      changes=(("optimizer_args", with_optimizer_arg(s.optimizer_args, "relative_step", "True")),))
    if not adafactor_relative_step(s):
        return
    default = "" if "relative_step" in kwargs else " (its default when relative_step is not given)"
    if s.lr_scheduler != "adafactor":
        yield Problem("note", "lr_scheduler",
                      f"Adafactor with relative_step=True{default} sets its own step size, so LR Scheduler "
                      f"'{s.lr_scheduler}' is replaced by 'adafactor' (Learning rate is its starting value)",
                      fix=ADAFACTOR_RECIPE, changes=(("lr_scheduler", "adafactor"),))
    separate = not (s.unet_lr == 0 and s.text_encoder_lr == 0)
    if separate and (s.unet_lr, s.text_encoder_lr) != (s.learning_rate, s.learning_rate):
        yield Problem("note", "unet_lr", "with relative_step=True Adafactor starts from Learning rate for every part; "
                      "the Unet and Text Encoder learning rates are not used", fix=ADAFACTOR_RECIPE)


@preflight_check("optimizer.scheduler")
def check_scheduler(ctx: CheckContext):
    s = ctx.settings
    scheduler = effective_scheduler(s)
    if s.lr_scheduler == "adafactor" and not is_adafactor(s):
        yield Problem("error", "lr_scheduler", f"the 'adafactor' scheduler works only with the Adafactor optimizer, "
                      f"not {_optimizer_name(s)}", fix="choose constant_with_warmup, cosine or another scheduler")
        return
    if s.lr_scheduler == "adafactor" and scheduler == "constant":
        yield Problem("note", "lr_scheduler", "the 'adafactor' scheduler needs Adafactor's relative_step=True; "
                      "'constant' is used instead", fix="choose constant_with_warmup (recommended for Adafactor)",
                      changes=(("lr_scheduler", "constant"),))
    if optimizer_facts(s.optimizer).schedule_free and s.lr_scheduler != "constant":
        yield Problem("note", "lr_scheduler", f"{_optimizer_name(s)} schedules its own learning rate, so "
                      f"'{s.lr_scheduler}' is not used: the scheduler is constant (as sd-scripts runs it)",
                      fix="for a warmup, add warmup_steps=N to Optimizer extra arguments",
                      changes=(("lr_scheduler", "constant"),))
    takes_warmup = SCHEDULERS.get(scheduler, (True, ()))[0] or bool(s.lr_scheduler_type)
    if _zero_warmup(s) and not takes_warmup:
        yield Problem("note", _warmup_field(s), _no_warmup_reason(s, scheduler) + ", so LR warmup is set to 0",
                      fix=ADAFACTOR_RECIPE if scheduler == "adafactor" else "choose constant_with_warmup to warm up",
                      changes=_zero_warmup(s))
        return
    if s.lr_warmup_steps > 0 and s.lr_warmup > 0:
        yield Problem("note", "lr_warmup_steps", f"LR warmup steps ({s.lr_warmup_steps}) override "
                      f"LR warmup ({s.lr_warmup} % of total steps)")
    total = ctx.total_steps
    warmup = trainer_warmup_steps(s, total) if total else 0
    if total and warmup >= total:
        yield Problem("warning", _warmup_field(s), f"the warmup ({warmup} steps) is as long as the whole run "
                      f"({total} steps), so the learning rate never reaches its value",
                      fix="use a warmup of about 5-10 % of the steps")
    if s.lr_scheduler_type:
        yield Problem("note", "lr_scheduler_type", f"{s.lr_scheduler_type!r} replaces LR Scheduler '{s.lr_scheduler}'")


def _no_warmup_reason(settings, scheduler: str) -> str:
    if optimizer_facts(settings.optimizer).schedule_free:
        return f"{_optimizer_name(settings)} warms up through its own warmup_steps argument, not LR warmup"
    if scheduler == "adafactor" and is_adafactor(settings):
        return "Adafactor with relative_step=True sets its own step size (and warmup)"
    if scheduler == "constant":
        return "the 'constant' scheduler has no warmup (kohya_ss also zeroes it when you pick constant)"
    return f"the '{scheduler}' scheduler has no warmup"


@preflight_check("optimizer.learning_rates")
def check_learning_rates(ctx: CheckContext):
    s = ctx.settings
    unet_lr, te_lr = s.train_lrs()
    single = s.unet_lr == 0 and s.text_encoder_lr == 0
    rates = {"learning_rate": s.learning_rate} if single else {
        key: value for key, value in (("unet_lr", unet_lr), ("text_encoder_lr", te_lr)) if value > 0}
    if not any(rates.values()):
        yield Problem("error", "learning_rate", "every learning rate is 0, so nothing would be trained",
                      fix="set Learning rate (e.g. 1e-4), or the Unet / Text Encoder learning rates")
        return
    if unet_lr > 0 and te_lr == 0:
        yield Problem("note", "text_encoder_lr", "Text Encoder learning rate is 0: the LoRA trains the UNet only "
                      "and has no text-encoder weights", fix="set it (e.g. half the Unet learning rate) to train both")
    elif unet_lr == 0 and te_lr > 0:
        yield Problem("warning", "unet_lr", "Unet learning rate is 0: only the text encoder is trained, which rarely "
                      "learns a subject or style", fix="set Unet learning rate (e.g. 1e-4)")
    if is_adafactor(s) and adafactor_relative_step(s):
        return  # a starting value for Adafactor's own schedule; any size is normal
    if optimizer_facts(s.optimizer).adaptive_lr:
        yield from _adaptive_rates(_optimizer_name(s), rates)
    else:
        yield from _usual_rates(_optimizer_name(s), rates, optimizer_facts(s.optimizer).lr_range)


def _adaptive_rates(name: str, rates: dict[str, float]):
    low = optimizer_facts(name).lr_range[0]
    for key, value in rates.items():
        if value < low:
            yield Problem("error", key, f"{name} finds its own step size and multiplies it by the learning rate, so it "
                          f"should be about 1, not {value:g}: the LoRA would barely change",
                          fix=f"set it to 1.0 (to make {name} gentler, add d_coef=0.5 to Optimizer extra arguments)")
    if len(rates) == 2 and rates["unet_lr"] != rates["text_encoder_lr"]:
        yield Problem("note", "text_encoder_lr", f"{name} uses one learning rate for all parts: the Unet's "
                      f"({rates['unet_lr']:g}) is used for the text encoder too (DAdaptAdam keeps the ratio as a layer scale)",
                      fix="give both the same value to make this explicit")


def _usual_rates(name: str, rates: dict[str, float], usual: tuple[float, float]):
    low, high = usual
    for key, value in rates.items():
        if value > high:
            yield Problem("warning", key, f"{value:g} is a very high learning rate for {name} (usual: {low:g} to {high:g}); "
                          "expect noise, burnt images or NaN loss", fix=RATE_FIX)
        elif value < low:
            yield Problem("warning", key, f"{value:g} is a very low learning rate for {name} (usual: {low:g} to {high:g}); "
                          "the LoRA will barely change", fix=RATE_FIX)
