"""kohya_ss's "Accelerate launch" settings: how many processes train together, on which GPUs and machines.

Nekoya runs them as a ``torch.distributed`` group started by ``torchrun`` (``trainer.distributed``); the
keys, labels and value forms stay kohya_ss's so its config files load as they are.
"""
from __future__ import annotations

from pydantic import BaseModel

from .field import setting

TAB = "Parameters"
SECTION = "Accelerate launch"


class AccelerateSettings(BaseModel):
    num_processes: int = setting(
        1, label="Number of processes", tab=TAB, section=SECTION, ge=1, le=1024,
        help="Processes that train together, one per GPU (on a CPU: each uses its share of the cores). Each "
             "trains Train batch size samples per step, so a step sees batch size × processes samples. With "
             "several machines: the processes of all of them together.",
    )
    num_machines: int = setting(
        1, label="Number of machines", tab=TAB, section=SECTION, ge=1, le=1024,
        help="More than 1: start the same config on every machine with torchrun (README: Several GPUs and "
             "machines); Start in the GUI trains on this machine only.",
    )
    multi_gpu: bool = setting(
        False, label="Multi GPU", tab=TAB, section=SECTION,
        help="Tick to train on several GPUs (kohya_ss passes --multi_gpu). Number of processes says how many.",
    )
    gpu_ids: str = setting(
        "", label="GPU IDs", tab=TAB, section=SECTION,
        help="Which GPUs of this machine to use, e.g. 0,1 (empty: the first Number of processes GPUs).",
    )
    main_process_port: int = setting(
        0, label="Main process port", tab=TAB, section=SECTION, ge=0, le=65535,
        help="The port the processes meet on (0: 29500, as accelerate). Change it when two runs share a machine.",
    )
    extra_accelerate_launch_args: str = setting(
        "", label="Extra accelerate launch arguments", tab=TAB, section=SECTION,
        help="accelerate launch flags that have a torchrun equivalent (--machine_rank, --main_process_ip, "
             "--rdzv_backend, --max_restarts, --monitor_interval, --same_network); others are refused by name.",
    )
