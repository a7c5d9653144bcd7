"""SD3 position embeddings as sd-scripts' SD3 trainer sets them: ``--enable_scaled_pos_embed`` (kohya_ss's
``sd3_enable_scaled_pos_embed``) and ``--pos_emb_random_crop_rate`` (``pos_emb_random_crop_rate``).

Scaled: sd-scripts' ``MMDiT.enable_scaled_pos_embed`` takes one latent size per dataset resolution
(round(sqrt(w·h)) // 8), and for each patched size S (latent size // 2) builds a sin-cos table of
int(1.5·S) x int(1.5·S) positions whose centre S x S patches span the same 16 units, whatever S is (its
``get_scaled_2d_sincos_pos_embed``, base size 16). An input of h x w patches takes the table of the first size whose
area limit it fits (between two sizes the limit is the mean of their areas; the last is (1.5·S)²; a larger input
takes the largest), centre-cropped; an input taller or wider than that table gets a table of its own longer side.
sd-scripts also adds that table to its area list, so what later inputs take depends on what the process saw
before; Nekoya keeps the list as the resolutions set it (the same for every process; with one resolution and
bucketed images, which never exceed its area, both pick the same tables).

Random crop: sd-scripts decides once per forward (``torch.rand(1) < rate``) and crops the whole batch at one
random place of its table (the stored max-size table, or the scaled one). Nekoya decides and places the crop per
training sample from the sample's row key (suffix ``/pos-emb-crop``), so the draws do not depend on how a batch is
split across processes; each sample's chance and crop distribution are sd-scripts'. Sample images are not
cropped at random (sd-scripts' forward also crops them; only training is meant to be).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from trainer.noise_sampling import row_generator

POS_EMBED_MAX_RATIO = 1.5  # sd-scripts' MMDiT.POS_EMBED_MAX_RATIO: a table is 1.5x its latent size a side
BASE_SIZE = 16  # the span of an image's positions in a scaled table
CROP_KEY_SUFFIX = "/pos-emb-crop"
LATENT_STRIDE = 8


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M, D) float64: sin then cos of each position times 1/10000^(2i/D) (the MAE / SD3 sin-cos embedding)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def scaled_sincos_table(embed_dim: int, grid_size: int, sample_size: int) -> torch.Tensor:
    """(grid_size², D) float32, rows in (row, column) order: the first half of each row encodes the column's
    coordinate, the second the row's. Coordinates step BASE_SIZE / sample_size and the centre sample_size x
    sample_size patches start at 0, so an image of sample_size patches spans positions 0..16."""
    scale = BASE_SIZE * grid_size / sample_size
    shift = scale * (grid_size - sample_size) / (2 * grid_size)
    coords = torch.arange(grid_size, dtype=torch.float32) / grid_size * scale - shift  # float32, as the numpy grid
    columns = coords[None, :].expand(grid_size, grid_size)
    rows = coords[:, None].expand(grid_size, grid_size)
    half = embed_dim // 2
    return torch.cat([sincos_1d(half, columns), sincos_1d(half, rows)], dim=1).float()


def latent_sizes(resolutions: Sequence[tuple[int, int]]) -> list[int]:
    """sd-scripts' latent size of each dataset resolution (w, h): round(sqrt(w·h)) // 8, once each."""
    return sorted({round(math.sqrt(w * h)) // LATENT_STRIDE for w, h in resolutions})


class ScaledPositions:
    """The scaled tables of a run's resolutions and which one an input of h x w patches takes."""

    def __init__(self, embed_dim: int, patch_size: int, sizes: Sequence[int]) -> None:
        if not sizes:
            raise ValueError("scaled position embeddings need at least one resolution")
        self.embed_dim = embed_dim
        patched = sorted({size // patch_size for size in sizes})
        limits = [(a * a + b * b) // 2 for a, b in zip(patched, patched[1:])]
        limits.append(int((patched[-1] * POS_EMBED_MAX_RATIO) ** 2))
        self.area_limits = list(zip(limits, patched))  # (largest area in patches, the patched size it takes)
        self._tables: dict[int, torch.Tensor] = {}
        self._moved: dict[int, torch.Tensor] = {}

    def sample_size(self, h: int, w: int) -> int:
        """The patched size whose table an input of h x w patches takes (its own longer side when too long)."""
        size = next((s for limit, s in self.area_limits if h * w <= limit), self.area_limits[-1][1])
        return size if max(h, w) <= int(size * POS_EMBED_MAX_RATIO) else max(h, w)

    def table_size(self, h: int, w: int) -> int:
        """How many patches a side that table has."""
        return int(self.sample_size(h, w) * POS_EMBED_MAX_RATIO)

    def table(self, h: int, w: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """(G, G, D): the table an input of h x w patches is cropped from (its copy on ``device`` in ``dtype`` is
        kept for the next call, as sd-scripts keeps it; the float32 table stays the source)."""
        size = self.sample_size(h, w)
        if size not in self._tables:
            grid = int(size * POS_EMBED_MAX_RATIO)
            self._tables[size] = scaled_sincos_table(self.embed_dim, grid, size).reshape(grid, grid, -1)
        moved = self._moved.get(size)
        if moved is None or moved.device != torch.device(device) or moved.dtype != dtype:
            moved = self._moved[size] = self._tables[size].to(device, dtype)
        return moved


def crop_offsets(row_keys: Sequence[str], rate: float, table_size: int, h: int, w: int
                 ) -> list[tuple[int, int] | None]:
    """Per sample: None (the centre crop) or a random (top, left) of an h x w crop of a table_size² table,
    drawn with probability ``rate`` from the sample's row key."""
    offsets: list[tuple[int, int] | None] = []
    for key in row_keys:
        generator = row_generator(key + CROP_KEY_SUFFIX)
        if rate > 0 and float(torch.rand(1, generator=generator, dtype=torch.float64)) < rate:
            top = int(torch.randint(0, table_size - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, table_size - w + 1, (1,), generator=generator))
            offsets.append((top, left))
        else:
            offsets.append(None)
    return offsets
