"""trainer.optim.lr_lambdas: the same learning rates as transformers'/diffusers' schedulers, without importing them."""
from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer.optim import OptimConfigError, SCHEDULERS, create_scheduler, plan_scheduler
from trainer.optim.lr_lambdas import SCHEDULES, lambda_scheduler, lr_lambda, schedule_options
from trainer.settings import TrainingSettings

pytestmark = pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")  # transformers, when we pass both
LR = 1e-3
RUNS = [(1, 0), (1, 1), (7, 0), (7, 3), (7, 10), (100, 0), (100, 20)]  # (total steps, warmup steps)
WSD = [{"warmup_type": w, "decay_type": d} for w in ("linear", "cosine", "1-sqrt") for d in ("linear", "cosine", "1-sqrt")]
OPTIONS: dict[str, list[dict]] = {
    "constant": [{}],
    "constant_with_warmup": [{}],
    "linear": [{}],
    "cosine": [{}, {"num_cycles": 1}, {"num_cycles": 3}],
    "cosine_with_restarts": [{"num_cycles": 1}, {"num_cycles": 3}, {"num_cycles": 2.5}],
    "polynomial": [{"power": 1.0}, {"power": 2.0}, {"power": 2, "lr_end": 1e-4}, {"power": 0.5, "lr_end": 0.0}],
    "inverse_sqrt": [{}, {"timescale": 5}],
    "cosine_with_min_lr": [{"min_lr_rate": 0.0}, {"min_lr_rate": 0.1}, {"min_lr": 1e-4},
                           {"min_lr_rate": 0.1, "num_cycles": 3}],
    "warmup_stable_decay": WSD + [{"min_lr_ratio": 0.1, "num_cycles": 3}, {"num_stable_steps": 2},
                                  {"decay_type": "linear", "num_decay_steps": 50}],
    "piecewise_constant": [{"step_rules": "1"}, {"step_rules": "1:3,0.1:5,0.01"}, {"step_rules": "0.5:2,0.2:2,0.1"},
                           {"step_rules": "1:50,0.3:10,0.05"}],
}


def optimizer() -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": LR / 2}]
    return torch.optim.SGD(params, lr=LR)


def reference(name: str, opt, warmup: int, total: int, options: dict):
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule(opt, **options)
    from transformers.optimization import get_scheduler

    if name == "warmup_stable_decay":
        options = {"num_decay_steps": max(1, total // 10), **options}
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=dict(options))


def ours(name: str, opt, warmup: int, total: int, options: dict):
    if name == "warmup_stable_decay":
        options = {"num_decay_steps": max(1, total // 10), **options}
    return lambda_scheduler(name, opt, warmup, total, options)


def lrs(scheduler, steps: int) -> list[list[float]]:
    seq = [scheduler.get_last_lr()]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        seq.append(scheduler.get_last_lr())
    return seq


def cases():
    for name, option_sets in OPTIONS.items():
        for total, warmup in RUNS:
            if name == "polynomial" and warmup == total:  # transformers divides by zero decay steps at the last step:
                continue  # test_polynomial_warmup_fills_the_run covers it
            for options in option_sets:
                yield pytest.param(name, total, warmup, options, id=f"{name}-{total}-{warmup}-{options}")


def test_every_schedule_is_covered():
    assert set(OPTIONS) == set(SCHEDULES) == set(SCHEDULERS) - {"adafactor"}


@pytest.mark.parametrize("name,total,warmup,options", cases())
def test_same_lrs_as_transformers(name, total, warmup, options):
    got = lrs(ours(name, optimizer(), warmup, total, options), total + 5)
    want = lrs(reference(name, optimizer(), warmup, total, options), total + 5)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"step {step}: {a} != {b}"  # the same float operations: exactly equal


def test_polynomial_warmup_fills_the_run():
    got = lrs(lambda_scheduler("polynomial", optimizer(), 5, 5, {"lr_end": 1e-5}), 7)
    assert [g[0] for g in got] == pytest.approx([0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-5, 1e-5, 1e-5], rel=1e-12)
    from transformers.optimization import get_scheduler

    with pytest.raises(ZeroDivisionError):  # what we no longer do
        lrs(get_scheduler("polynomial", optimizer(), 5, 5, {"lr_end": 1e-5}), 7)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_state_dict_round_trip_continues(name):
    options = OPTIONS[name][-1]
    whole = lrs(ours(name, optimizer(), 10, 100, options), 100)
    first = ours(name, optimizer(), 10, 100, options)
    head = lrs(first, 40)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # loaded back as trainer.state does: weights_only
    pickle.dumps(first)  # the whole scheduler pickles (partials of module functions)
    second = ours(name, optimizer(), 10, 100, options)
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert head + lrs(second, 60)[1:] == whole


@pytest.mark.parametrize("name", ["cosine", "piecewise_constant"])
def test_resumes_from_a_state_saved_by_the_old_schedulers(name):
    options = OPTIONS[name][-1]
    old = reference(name, optimizer(), 10, 100, options)
    lrs(old, 30)
    new = ours(name, optimizer(), 10, 100, options)
    new.load_state_dict(old.state_dict())
    assert lrs(new, 20) == lrs(old, 20)


def settings(**overrides) -> TrainingSettings:
    return TrainingSettings(**{"optimizer": "AdamW", "learning_rate": LR, **overrides})


def test_create_scheduler_matches_transformers_for_the_planned_kwargs():
    s = settings(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3, lr_warmup=10)
    plan = plan_scheduler(s, 50)
    from transformers.optimization import get_scheduler

    want = get_scheduler(plan.name, optimizer(), plan.warmup_steps, plan.total_steps, dict(plan.kwargs))
    assert lrs(create_scheduler(plan, optimizer()), 55) == lrs(want, 55)


@pytest.mark.parametrize("name,args,words", [
    ("cosine", "T_max=100", ["cosine", "T_max", "num_cycles"]),
    ("warmup_stable_decay", "num_training_steps=5", ["num_training_steps"]),
    ("polynomial", "lr_end=0.01", ["lr_end", "smaller"]),
    ("cosine_with_min_lr", "min_lr=0.0001 min_lr_rate=0.1", ["Only one"]),
    ("warmup_stable_decay", "decay_type='exp'", ["decay_type", "exp"]),
    ("piecewise_constant", "step_rules='1:x,0.1'", ["step_rules"]),
    ("piecewise_constant", "step_rules=(1,2)", ["step_rules"]),
    ("inverse_sqrt", "timescale=0", ["step"]),
    ("cosine", "num_cycles='many'", ["num_cycles"]),
    ("warmup_stable_decay", "num_decay_steps='x'", ["num_decay_steps"]),
])
def test_bad_lr_scheduler_args_name_the_field(name, args, words):
    plan = plan_scheduler(settings(lr_scheduler=name, lr_scheduler_args=args), 20)
    with pytest.raises(OptimConfigError) as info:
        create_scheduler(plan, optimizer())
    assert info.value.field == "lr_scheduler_args" and all(w in str(info.value) for w in words), str(info.value)


def test_constant_schedules_ignore_args_with_a_note():
    plan = plan_scheduler(settings(lr_scheduler="constant_with_warmup", lr_scheduler_args="T_max=10", lr_warmup=10), 20)
    assert any("T_max ignored" in note for note in plan.notes)
    assert [g[0] for g in lrs(create_scheduler(plan, optimizer()), 3)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])


def test_min_lr_alone_is_accepted():
    plan = plan_scheduler(settings(lr_scheduler="cosine_with_min_lr", lr_scheduler_args="min_lr=0.0001"), 20)
    assert plan.kwargs == {"min_lr": 1e-4}
    assert lrs(create_scheduler(plan, optimizer()), 20)[-1][0] == pytest.approx(1e-4)  # (past the end it rises again)


def test_last_epoch_and_options_listed():
    assert schedule_options("polynomial") == ("lr_end", "power")
    assert schedule_options("constant") == ()
    opt = optimizer()
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = lambda_scheduler("linear", opt, 0, 10, {"last_epoch": 4})
    assert scheduler.last_epoch == 5 and lr_lambda("linear", 0, 10, LR)(5) == 0.5


@pytest.mark.slow
def test_starting_a_run_imports_neither_transformers_nor_diffusers():
    names = sorted(n for n in SCHEDULERS if n != "adafactor")
    code = textwrap.dedent(f"""
        import sys, torch
        import trainer.optim.schedulers as schedulers
        from trainer.settings import TrainingSettings
        for name in {names!r}:
            plan = schedulers.plan_scheduler(TrainingSettings(lr_scheduler=name, lr_warmup=10), 100)
            opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
            sched = schedulers.create_scheduler(plan, opt)
            opt.step(); sched.step()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "diffusers")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
