"""Kohya LoHa and Kohya LoKr: sd-scripts' own ``networks.loha`` / ``networks.lokr`` modules, on Nekoya's models.

Each module adds ``F.linear(x, ΔW)`` (``F.conv2d`` for convs) to its frozen layer's output, ΔW rebuilt from the
trained factors at every forward, as sd-scripts does:

* LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank``; a 3x3 conv flattens its kernel into the input
  side (``w_b``: rank x in·k·k), or with ``use_tucker`` rebuilds each factor from a core ``hada_t``
  (rank x rank x k x k) and two matrices ``w_a`` (rank x out), ``w_b`` (rank x in).
* LoKr: ``ΔW = kron(w1, w2) · alpha / rank`` with ``w1`` (out_l x in_m) always a full matrix and ``w2`` (out_k x in_n)
  full when ``rank >= max(out_k, in_n) / 2`` (then alpha = rank: no scaling), else ``w2_a @ w2_b`` (3x3 conv: the
  kernel flattened into ``w2_b``, or a Tucker core ``lokr_t2`` with ``use_tucker``); ``(out_l, out_k)`` and
  ``(in_m, in_n)`` come from sd-scripts' ``factorization`` of the layer's sizes with ``factor``.

The tensor names, shapes and initialisation are sd-scripts' (they are also LyCORIS's names, so A1111, ComfyUI and
LyCORIS load the files). Rank dropout drops rows of ΔW (output channels) and rescales by 1 / (1 - p); module dropout
skips the whole update; neuron dropout is not read by these modules (as in sd-scripts). Dropout draws come from the
run's generator (``LoRANetwork.set_dropout_generator``), like Nekoya's LoRA modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .module import DropoutDraws, WrappedLayer, _module_draw


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """sd-scripts' (and LyCORIS's) split of ``dimension`` into ``m * n`` with m <= n: ``factor`` itself when it
    divides the dimension, else the most balanced pair whose smaller side is at most ``factor`` (-1: any)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class _HadamardWeight(torch.autograd.Function):
    """``((w1a @ w1b) * (w2a @ w2b)) * scale``, recomputing the two products in backward instead of keeping them
    (sd-scripts' HadaWeight: the products are as large as the layer's weight)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad_out):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad_out = grad_out * ctx.scale
        temp = grad_out * (w2a @ w2b)
        grad_w1a, grad_w1b = temp @ w1b.T, w1a.T @ temp
        temp = grad_out * (w1a @ w1b)
        grad_w2a, grad_w2b = temp @ w2b.T, w2a.T @ temp
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def rebuild_tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """A conv weight (out, in, k, k) from a Tucker core (rank, rank, k, k), ``w_a`` (rank, out), ``w_b`` (rank, in)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, w_a, w_b)


class _WeightDeltaModule(WrappedLayer):
    """What LoHa and LoKr share: the wrapped layer, its geometry, alpha, dropouts and the forward."""

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None, rank_dropout: float,
                 module_dropout: float, use_tucker: bool) -> None:
        super().__init__(org_module)
        self.lora_name = lora_name
        self.rank = int(rank)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
            self._conv_args = dict(stride=org_module.stride, padding=org_module.padding,
                                   dilation=org_module.dilation, groups=org_module.groups)
            self.tucker = bool(use_tucker) and any(k != 1 for k in self.kernel_size)
            self.conv_mode = "1x1" if self.kernel_size == (1, 1) else ("tucker" if self.tucker else "flat")
        else:
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
            self.kernel_size, self.tucker, self.conv_mode = None, False, None
        # alpha 0 / None means alpha = rank (sd-scripts' rule)
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(self.rank)))
        self.scale = self.alpha.item() / self.rank
        self.register_load_state_dict_post_hook(lambda module, _keys: module._rescale())
        self.multiplier = 1.0
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.draws: DropoutDraws | None = None
        self.draw_key = 0
        self._mask_generator: torch.Generator | None = None

    def _rescale(self) -> None:
        """alpha may come from a weights file."""
        self.scale = self.alpha.item() / self.rank

    def diff_weight(self) -> torch.Tensor:
        """ΔW shaped as the layer's weight for Linear and 3x3 convs, (out, in) for 1x1 convs; alpha / rank in."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The weight change this module adds to its base layer, in the layer's weight shape (for tests, merges)."""
        delta = self.diff_weight().float()
        if self.conv_mode == "1x1":
            delta = delta[:, :, None, None]
        return delta * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        seed = self.draws.seed_for(self.draw_key) if self.draws is not None else None
        if self.training and self.module_dropout and _module_draw(seed) < self.module_dropout:
            return out
        diff = self.diff_weight()
        scale = 1.0
        if self.training and self.rank_dropout:  # output channels of ΔW, one mask per forward (sd-scripts)
            keep = torch.rand(diff.size(0), generator=self._generator_for(diff.device, seed), device=diff.device)
            keep = (keep > self.rank_dropout).to(diff.dtype)
            diff = diff * keep.view(-1, *([1] * (diff.dim() - 1)))
            scale = 1.0 / (1.0 - self.rank_dropout)
        if not self.is_conv:
            return out + F.linear(x, diff) * (self.multiplier * scale)
        if self.conv_mode == "1x1":
            diff = diff[:, :, None, None]
        return out + F.conv2d(x, diff, **self._conv_args) * (self.multiplier * scale)

    def _generator_for(self, device: torch.device, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        if self._mask_generator is None or self._mask_generator.device != device:
            self._mask_generator = torch.Generator(device=device)
        return self._mask_generator.manual_seed(seed)

    def apply_max_norm(self, max_norm: float, device) -> tuple[None, float]:
        """sd-scripts' networks.loha/lokr have no max-norm rule (train_network turns scale_weight_norms off)."""
        return None, 0.0


class KohyaLoHaModule(_WeightDeltaModule):
    """sd-scripts' networks.loha LoHaModule: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and
    ``hada_t1``, ``hada_t2`` for Tucker 3x3 convs) and ``alpha``."""

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, use_tucker: bool = False,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__(lora_name, org_module, rank, alpha, rank_dropout, module_dropout, use_tucker)
        r, g = self.rank, init_generator
        if self.conv_mode == "tucker":
            k = self.kernel_size
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(r, self.out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(r, self.in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(r, self.out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(r, self.in_dim))
            # sd-scripts' order and values: w1_a = 0 makes ΔW 0 at the start
            nn.init.normal_(self.hada_t1, std=0.1, generator=g)
            nn.init.normal_(self.hada_t2, std=0.1, generator=g)
            nn.init.normal_(self.hada_w1_b, std=1.0, generator=g)
            nn.init.constant_(self.hada_w1_a, 0)
            nn.init.normal_(self.hada_w2_b, std=1.0, generator=g)
            nn.init.normal_(self.hada_w2_a, std=0.1, generator=g)
            return
        flat_in = self.in_dim * (math.prod(self.kernel_size) if self.conv_mode == "flat" else 1)
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_dim, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_dim, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, flat_in))
        # w2_a = 0 makes ΔW 0 at the start
        nn.init.normal_(self.hada_w1_a, std=0.1, generator=g)
        nn.init.normal_(self.hada_w1_b, std=1.0, generator=g)
        nn.init.constant_(self.hada_w2_a, 0)
        nn.init.normal_(self.hada_w2_b, std=1.0, generator=g)

    def diff_weight(self) -> torch.Tensor:
        if self.tucker:
            w1 = torch.einsum("i j ..., j r, i p -> p r ...", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            w2 = torch.einsum("i j ..., j r, i p -> p r ...", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
            return w1 * w2 * self.scale
        diff = _HadamardWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        if self.conv_mode == "flat":
            diff = diff.reshape(self.out_dim, self.in_dim, *self.kernel_size)
        return diff


class KohyaLoKrModule(_WeightDeltaModule):
    """sd-scripts' networks.lokr LoKrModule: ``lokr_w1`` and ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (and
    ``lokr_t2`` for Tucker 3x3 convs), and ``alpha``."""

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, use_tucker: bool = False, factor: int = -1,
                 init_generator: torch.Generator | None = None) -> None:
        super().__init__(lora_name, org_module, rank, alpha, rank_dropout, module_dropout, use_tucker)
        r, g = self.rank, init_generator
        in_m, in_n = factorization(self.in_dim, int(factor))
        out_l, out_k = factorization(self.out_dim, int(factor))
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))  # always a full matrix
        self.use_w2 = r >= max(out_k, in_n) / 2
        if self.use_w2:  # a full second factor (with the kernel for 3x3 convs)
            k = self.kernel_size if self.conv_mode in ("tucker", "flat") else ()
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *self.kernel_size))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, out_k))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_n))
        else:
            flat = math.prod(self.kernel_size) if self.conv_mode == "flat" else 1
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_n * flat))
        if self.use_w2:  # both factors full: sd-scripts sets alpha = rank (no scaling)
            self.alpha.fill_(float(r))
            self.scale = 1.0
        # sd-scripts' initialisation: w2 (or w2_b) = 0 makes ΔW = kron(w1, 0) = 0 at the start
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5), generator=g)
        if self.use_w2:
            nn.init.constant_(self.lokr_w2, 0)
        else:
            if self.tucker:
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5), generator=g)
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5), generator=g)
            nn.init.constant_(self.lokr_w2_b, 0)

    def _rescale(self) -> None:
        self.scale = 1.0 if self.use_w2 else self.alpha.item() / self.rank

    def diff_weight(self) -> torch.Tensor:
        if self.use_w2:
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        w1 = self.lokr_w1
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        diff = torch.kron(w1, w2.contiguous())
        if self.scale != 1:
            diff = diff * self.scale
        if self.conv_mode == "flat" and diff.dim() == 2:
            diff = diff.reshape(self.out_dim, self.in_dim, *self.kernel_size)
        return diff
