"""Singular value decompositions for the LoRA tools, and sd-scripts' dynamic rank rules.

A LoRA's ``up @ down`` has rank at most r, so its exact SVD comes from two thin QR
decompositions and an r×r SVD: O((out + in)·r²) instead of an SVD of the full
out×in matrix (1280×11520 for an SD 3x3 conv). Extraction needs only the top
directions of a full matrix, which the Gram matrix gives far faster than an SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.tools.requests import DYNAMIC_METHODS

MIN_SV = 1e-6  # sd-scripts: a module whose largest singular value is below this is zero (rank 1)


@dataclass
class Factors:
    """``matrix ≈ U · diag(S) · Vh`` with singular values in descending order."""

    U: torch.Tensor  # (out, k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, in)

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as 2-D matrices of the best rank-``rank`` approximation: up = U·S, down = Vh."""
        return self.U[:, :rank] * self.S[:rank], self.Vh[:rank]

    def retained(self, rank: int) -> tuple[float, float]:
        """(Frobenius norm retained, sum of singular values retained) as fractions of 1."""
        total_sq, total = float(self.S.pow(2).sum()), float(self.S.abs().sum())
        if total_sq == 0.0:
            return 1.0, 1.0
        kept = self.S[:rank]
        return (float(kept.pow(2).sum()) / total_sq) ** 0.5, float(kept.abs().sum()) / total

    def dropped_squared(self, rank: int) -> float:
        """‖matrix − rank-``rank`` approximation‖_F²."""
        return float(self.S[rank:].pow(2).sum())


def factor_product(up: torch.Tensor, down: torch.Tensor) -> Factors:
    """Exact SVD of ``up @ down`` (2-D, float32) without forming the product."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return Factors(q_up @ u, s, vh @ q_down.T)


def top_factors(matrix: torch.Tensor, rank: int) -> Factors:
    """The top ``rank`` singular triplets of a full 2-D matrix (used by extraction), all singular values.

    From the eigen decomposition of the smaller Gram matrix in float64: a matrix product
    and an eigh of at most 1280×1280 for SD models, 10-20× faster on a CPU than a full
    SVD of a 1280×11520 conv weight, and exact to float32 precision for the directions kept.
    """
    a = matrix.double()
    transposed = a.shape[0] > a.shape[1]
    if transposed:
        a = a.T
    eigenvalues, eigenvectors = torch.linalg.eigh(a @ a.T)  # ascending
    u = eigenvectors.flip(1)[:, :rank]
    # uᵀa = S·Vh; taking S as the row norms (not √eigenvalue) keeps Vh's rows unit-length even for
    # directions at rounding level, so up and down stay balanced
    projected = u.T @ a
    kept = projected.norm(dim=1)
    vh = projected / torch.where(kept > 0, kept, 1.0)[:, None]
    singular = torch.cat([kept, eigenvalues.flip(0)[rank:].clamp(min=0).sqrt()])
    u, vh = (vh.T, u.T) if transposed else (u, vh)
    return Factors(u.to(matrix.dtype), singular.to(matrix.dtype), vh.to(matrix.dtype))


# ---- sd-scripts' dynamic rank rules (networks/resize_lora.py); each returns a rank >= 1 ----------
# Each is named as its method in trainer.tools.requests.DYNAMIC_METHODS (the one list of them).

def sv_ratio(S: torch.Tensor, ratio: float) -> int:
    """Keep singular values larger than S[0] / ratio."""
    return int((S > S[0] / ratio).sum())


def sv_cumulative(S: torch.Tensor, fraction: float) -> int:
    """Smallest rank whose singular values sum to ``fraction`` of the total."""
    cumulative = torch.cumsum(S, 0) / S.sum()
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=S.dtype))) + 1


def sv_fro(S: torch.Tensor, fraction: float) -> int:
    """Smallest rank that keeps ``fraction`` of the Frobenius norm."""
    cumulative = torch.cumsum(S.pow(2), 0) / S.pow(2).sum()
    return int(torch.searchsorted(cumulative, torch.tensor(fraction**2, dtype=S.dtype))) + 1


# by name, so a method declared without a rule fails here, at import
RANK_RULES = {method: globals()[method] for method in DYNAMIC_METHODS}


def choose_rank(S: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The new rank: ``max_rank``, or the dynamic rule's choice capped at it; 1 for a zero matrix."""
    if len(S) == 0 or float(S[0]) <= MIN_SV:
        return 1
    rank = RANK_RULES[method](S, float(param)) if method else max_rank
    return max(1, min(rank, max_rank, len(S)))
