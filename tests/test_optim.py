"""Optimizers, schedulers, precision and the optimizer step, on CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.optim import OPTIMIZERS, SCHEDULERS, OptimConfigError, create_scheduler, parse_literal_args, plan_optimizer, plan_scheduler
from trainer.optim.precision import Precision
from trainer.optim.rules import decide_precision
from trainer.optim.stepper import OptimizerStepper
from trainer.settings import TrainingSettings


def settings(**overrides) -> TrainingSettings:
    return TrainingSettings(**overrides)


def groups(lr: float = 1e-3) -> list[dict]:
    torch.manual_seed(0)
    return [
        {"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": lr, "name": "unet"},
        {"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": lr / 2, "name": "textencoder"},
    ]


def take_steps(optimizer, scheduler, params, n=4):
    for _ in range(n):
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


ADAPTIVE = {name for name, kind in OPTIMIZERS.items() if kind.adaptive_lr}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_takes_a_step(name):
    lr = 1.0 if name in ADAPTIVE else 1e-2
    s = settings(optimizer=name, learning_rate=lr, lr_scheduler="constant", lr_warmup=0)
    plan = plan_optimizer(s, "cpu")
    param_groups = groups(lr)
    params = [p for g in param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    optimizer = plan.create(param_groups)
    if name in ADAPTIVE:  # one lr for all groups, or the optimizer refuses to step
        assert len({g["lr"] for g in optimizer.param_groups}) == 1 and plan.notes
    sched_plan = plan_scheduler(s, total_steps=10, override=plan.scheduler_override)
    # RAdam leaves the weights alone while its variance estimate is not yet usable (about 5 steps)
    take_steps(optimizer, create_scheduler(sched_plan, optimizer), params, n=8 if "radam" in name else 4)
    assert all(not torch.equal(b, p) for b, p in zip(before, params)), f"{name} did not change the parameters"
    assert plan.description().endswith(plan.cls.__name__ + (f"({','.join(f'{k}={v}' for k, v in plan.kwargs.items())})" if plan.kwargs else ""))


@pytest.mark.parametrize("name", sorted(n for n in SCHEDULERS if n != "adafactor"))
def test_every_scheduler_steps(name):
    s = settings(lr_scheduler=name, lr_warmup=20, optimizer="AdamW", learning_rate=1e-3)
    plan = plan_scheduler(s, total_steps=20)
    optimizer = plan_optimizer(s, "cpu").create(groups())
    scheduler = create_scheduler(plan, optimizer)
    lrs = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(lr >= 0 for lr in lrs)
    if name in ("cosine", "linear", "polynomial", "cosine_with_restarts"):
        assert plan.warmup_steps == 4 and lrs[2] > lrs[0] and lrs[-1] < max(lrs)
    if name == "constant":
        assert plan.warmup_steps == 0 and plan.notes and len(set(lrs)) == 1


def test_warmup_steps_override_percent():
    assert plan_scheduler(settings(lr_scheduler="cosine", lr_warmup=10), 105).warmup_steps == 10  # int(10.5)
    assert plan_scheduler(settings(lr_scheduler="cosine", lr_warmup=10, lr_warmup_steps=7), 105).warmup_steps == 7


def test_adafactor_relative_step_with_warmup_is_handled():
    s = settings(optimizer="Adafactor", optimizer_args="", lr_scheduler="cosine", lr_warmup=10, learning_rate=1e-3)
    plan = plan_optimizer(s, "cpu")
    assert plan.kwargs["relative_step"] is True and plan.lr is None and plan.scheduler_override == "adafactor"
    assert not plan.notes  # the preflight check says it (trainer.preflight.optimizer), once
    param_groups = groups()
    optimizer = plan.create(param_groups)
    assert all("lr" not in g or g["lr"] is None for g in optimizer.param_groups)
    sched_plan = plan_scheduler(s, 10, override=plan.scheduler_override)
    assert sched_plan.warmup_steps == 0 and sched_plan.notes
    scheduler = create_scheduler(sched_plan, optimizer)
    params = [p for g in param_groups for p in g["params"]]
    take_steps(optimizer, scheduler, params)
    stepper = OptimizerStepper(optimizer, scheduler, params, 1, 0.0, None)
    assert all(lr > 0 for lr in stepper.group_lrs().values())


def test_adafactor_warmup_init_forces_relative_step_and_fixed_lr_mode():
    plan = plan_optimizer(settings(optimizer="Adafactor", optimizer_args="relative_step=False warmup_init=True"), "cpu")
    assert plan.kwargs["relative_step"] is True
    fixed = settings(optimizer="Adafactor", lr_scheduler="adafactor",
                     optimizer_args="scale_parameter=False relative_step=False warmup_init=False")
    plan = plan_optimizer(fixed, "cpu")
    assert plan.lr == fixed.learning_rate and plan.scheduler_override == "constant"


def test_optimizer_args_are_python_literals():
    assert parse_literal_args("betas=(0.9,0.99) weight_decay=0.1 decouple=True d_coef=2", "optimizer_args") == {
        "betas": (0.9, 0.99), "weight_decay": 0.1, "decouple": True, "d_coef": 2,
    }
    with pytest.raises(OptimConfigError) as err:
        parse_literal_args("betas=(0.9,", "optimizer_args")
    assert err.value.field == "optimizer_args"
    plan = plan_optimizer(settings(optimizer="AdamW", optimizer_args="weight_decay=0.1 betas=(0.9,0.99)"), "cpu")
    optimizer = plan.create(groups())
    assert optimizer.defaults["weight_decay"] == 0.1 and optimizer.defaults["betas"] == (0.9, 0.99)


def test_sgd_nesterov_gets_momentum_and_unknown_names_fail():
    plan = plan_optimizer(settings(optimizer="SGDNesterov"), "cpu")
    assert plan.kwargs == {"nesterov": True, "momentum": 0.9}
    assert plan_optimizer(settings(optimizer="torch.optim.RMSprop"), "cpu").cls is torch.optim.RMSprop
    with pytest.raises(OptimConfigError) as err:
        plan_optimizer(settings(optimizer="NoSuchOptimizer"), "cpu").cls  # imported when the run creates it
    assert err.value.field == "optimizer"


def resolve_precision(s, device: str, native_bf16: bool = False, gpu_bf16: bool = True) -> tuple[Precision, tuple]:
    choice = decide_precision(s, device, native_bf16, gpu_bf16)
    return Precision.of(choice, torch.device("cpu")), tuple(note.message for note in choice.notes)


def test_precision_on_cpu_degrades_with_a_note():
    p, notes = resolve_precision(settings(mixed_precision="bf16", full_bf16=True), "cpu")
    assert p.mode == "no" and p.network_dtype == torch.float32 and p.make_scaler() is None
    assert any("without bf16 instructions" in n for n in notes)
    p, notes = resolve_precision(settings(mixed_precision="fp16"), "cpu")
    assert p.mode == "no" and p.base_dtype == torch.float32 and any("needs a GPU" in n for n in notes)
    assert resolve_precision(settings(mixed_precision="no"), "cpu")[1] == ()


def test_bf16_runs_on_a_cpu_with_bf16_instructions():
    # what sd-scripts does through accelerate: bf16 weights and bf16 autocast; fp16 stays a GPU thing
    p, notes = resolve_precision(settings(mixed_precision="bf16", full_bf16=True), "cpu", native_bf16=True)
    assert (p.mode, p.base_dtype, p.network_dtype, notes) == ("bf16", torch.bfloat16, torch.bfloat16, ())
    assert p.make_scaler() is None
    with p.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    fp16, notes = resolve_precision(settings(mixed_precision="fp16"), "cpu", native_bf16=True)
    assert fp16.mode == "no" and any("bf16 would be faster" in n for n in notes)


def test_a_gpu_without_bf16_runs_fp16_and_full_precision_notes_name_their_field():
    choice = decide_precision(settings(mixed_precision="bf16"), "cuda", gpu_bf16=False)
    assert (choice.mode, choice.grad_scaler) == ("fp16", True) and choice.notes[0].field == "mixed_precision"
    choice = decide_precision(settings(mixed_precision="bf16", full_fp16=True), "cuda")
    assert choice.mode == "bf16" and not choice.full and [n.field for n in choice.notes] == ["full_fp16"]
    assert decide_precision(settings(mixed_precision="fp16", full_fp16=True), "cuda").full


def test_stepper_accumulates_and_clips():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 1.0, "name": "unet"}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stepper = OptimizerStepper(optimizer, scheduler, [param], grad_accum=2, max_grad_norm=1.0, scaler=None)
    for target in (torch.full((4,), 10.0), torch.full((4,), 30.0)):
        stepper.backward(((param - target) ** 2).sum() / 2)
    torch.testing.assert_close(param.grad, torch.full((4,), -20.0))  # mean of the two micro-batches
    stepper.step()
    assert param.grad is None
    assert param.norm().item() == pytest.approx(1.0)  # clipped to norm 1
    assert stepper.group_lrs() == {"unet": 1.0}


@pytest.mark.slow
def test_adamw_steps_without_importing_dynamo_and_matches_torch(tmp_path):
    """The trainer's AdamW (plan_optimizer -> create) runs its steps, zero_grad, state_dict and a scheduler
    without importing torch._dynamo, and its updates are bit-identical to a stock torch.optim.AdamW's."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, sys, types, torch\n"
        "from trainer.optim import create_scheduler, plan_optimizer, plan_scheduler\n"
        "def run(make):\n"
        "    torch.manual_seed(0)\n"
        "    ps = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(3)]\n"
        "    opt = make([{'params': ps[:2], 'lr': 1e-2}, {'params': ps[2:], 'lr': 1e-3}])\n"
        "    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))\n"
        "    for _ in range(4):\n"
        "        sum((p ** 3).sum() for p in ps).backward()\n"
        "        torch.nn.utils.clip_grad_norm_(ps, 1.0)\n"
        "        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "    return [p.detach().clone() for p in ps], opt\n"
        "s = types.SimpleNamespace(optimizer='AdamW', optimizer_args='', learning_rate=1e-2)\n"
        "ours, opt = run(plan_optimizer(s, 'cpu').create)\n"
        "loaded = 'torch._dynamo' in sys.modules\n"
        "theirs, _ = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, fused=True))\n"
        "same = all(torch.equal(a, b) for a, b in zip(ours, theirs))\n"
        "moved = not torch.equal(ours[0], run(lambda g: torch.optim.SGD(g, lr=0.0))[0][0])\n"
        "print('PROBE', json.dumps({'dynamo': loaded, 'same': same, 'moved': moved, 'fused': opt.defaults['fused']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parent.parent))
    line = next((line for line in done.stdout.splitlines() if line.startswith("PROBE")), None)
    assert line is not None, done.stderr[-2000:]
    assert json.loads(line.split(" ", 1)[1]) == {"dynamo": False, "same": True, "moved": True, "fused": True}


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left as they are
def test_clip_grad_norm_gives_torchs_gradients(max_norm):
    from trainer.optim.stepper import clip_grad_norm

    torch.manual_seed(0)
    shapes = [(8, 32), (32, 8), (4, 4, 3, 3), (7,)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(3))]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(3))]
    for a, b in zip(ours[:-1], theirs[:-1]):  # the last one has no gradient
        a.grad = torch.randn(a.shape) * 3
        b.grad = a.grad.clone()
    clip_grad_norm(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    for a, b in zip(ours[:-1], theirs[:-1]):
        assert torch.equal(a.grad, b.grad)
    assert ours[-1].grad is None
    total = torch.linalg.vector_norm(torch.stack([a.grad.norm() for a in ours[:-1]]))
    assert total.item() == pytest.approx(min(max_norm, total.item()), rel=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, kind in OPTIMIZERS.items() if kind.schedule_free))
def test_schedule_free_optimizers_run_constant_and_switch_to_their_averaged_weights_for_saving(name):
    """sd-scripts gives Schedule-Free optimizers a constant (dummy) scheduler and calls eval() before sampling and
    saving, train() after: the saved weights are the averaged ones, training goes on from its own."""
    import contextlib

    from trainer.network import LoRANetwork, LoraTarget, NetworkSpec, Role
    from trainer.optim.rules import effective_scheduler
    from trainer.run_setup import schedule_free_eval

    assert effective_scheduler(name, {}, "cosine") == "constant"

    class Transformer2DModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(8, 8)

    root = torch.nn.Module()
    root.block = Transformer2DModel()
    network = LoRANetwork.build([LoraTarget("lora_unet", root, ("Transformer2DModel",), Role.UNET)],
                                NetworkSpec(rank=2, alpha=2))
    s = settings(optimizer=name, learning_rate=1.0 if OPTIMIZERS[name].adaptive_lr else 1e-2)
    optimizer = plan_optimizer(s, "cpu").create(network.param_groups({Role.UNET: s.learning_rate}))
    params = list(network.parameters())
    take_steps(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), params, n=8)
    training = network.lora_state_dict(copy=True)
    network.eval_weights = lambda: schedule_free_eval(optimizer)
    saved = network.lora_state_dict()
    assert any(not torch.equal(saved[k], training[k]) for k in saved)  # the averaged sequence
    network.eval_weights = contextlib.nullcontext
    back = network.lora_state_dict(copy=True)  # train()'s weights again (the swap is a lerp: up to rounding)
    assert all(torch.allclose(back[k], training[k], atol=1e-6) for k in training)


@pytest.mark.slow
def test_a_schedule_free_run_trains_and_saves_its_averaged_weights(tiny_sd1_dir, tmp_path):
    from test_train import tiny_settings
    from trainer.devtools.synthetic import make_image_folder
    from trainer.loop import train

    images = make_image_folder(tmp_path / "img", {"1_sks dog": 2}, sizes=[(64, 64)], seed=3)
    settings = tiny_settings(tiny_sd1_dir, images, tmp_path / "out", optimizer="AdamWScheduleFree",
                             lr_scheduler="cosine", max_train_steps=3, save_every_n_steps=2)
    result = train(settings)
    assert result.status == "finished", result.error
    assert len(result.files) == 2  # the step-2 save and the final one, both in eval (averaged) weights
