"""Data-parallel training on ``torch.distributed``, started by ``torchrun``.

``rules`` is torch-free (the check and the GUI read it); ``group`` joins a worker to its process group,
``sync`` keeps the ranks at the same step, ``launcher`` starts a group on this machine and relays its
events and commands, ``wire`` carries events between processes as JSON lines.
"""
