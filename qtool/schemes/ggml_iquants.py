"""GGML's lattice i-quants: groups of 4 (or 8) magnitudes that must form a point of a fixed grid, their
signs apart, under 6- or 4-bit sub-block scales in super-blocks of 256 (llama.cpp's IQ3_S, ...).

The grids are llama.cpp's (gguf-py's tables, the facts its dequantizer reads); a group whose rounded
levels are not a grid point takes the grid neighbour nearest by importance-weighted distance, from the
neighbour lists llama.cpp builds (``iq3xs_init_impl``: every grid point at the two or three smallest
distances, in order of distance then index). The search and the sums run in llama.cpp's order, so the
bytes equal libggml's (tests/test_ggml.py), with or without an importance matrix.
"""
from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch

from qtool.schemes.base import register
from qtool.schemes.ggml import QK_K, GGMLType, fp16_bytes, fp16_from_bytes, nearest_int, pack_bits, unpack_bits


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded (torch's vectorized float32 sqrt is not always: float64, then float32, is)."""
    return torch.sqrt(values.double()).float()


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension left to right in float32, as a C loop adds (keepdim)."""
    total = torch.zeros_like(terms[..., :1])
    for j in range(terms.shape[-1]):
        total = total + terms[..., j:j + 1]
    return total


@functools.cache
def grid_values(type_name: str) -> torch.Tensor:
    """The dequantized magnitudes of a type's grid points, (G, 4 or 8) float32: gguf-py's table."""
    import gguf.quants

    table = getattr(gguf.quants, type_name)
    table.init_grid()
    return torch.from_numpy(np.asarray(table.grid).reshape(table.grid_shape).copy())


@functools.cache
def lattice(type_name: str, nwant: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels (G, 4) int64 of the grid points, each level l standing for the magnitude 2l + 1; map
    (8^4,) from a group's levels (sum of l_i << 3i) to its grid index, -1 off the grid; neighbours
    (8^4, M) int64 of the grid points llama.cpp tries for an off-grid group, in its order, -1 padded)."""
    values = grid_values(type_name).numpy()
    levels = torch.from_numpy(np.searchsorted(np.unique(values), values)).long()    # magnitude rank = l
    codes = (levels << torch.tensor([0, 3, 6, 9])).sum(-1)
    grid_map = torch.full((8 ** 4,), -1, dtype=torch.long)
    grid_map[codes] = torch.arange(len(levels))
    every = torch.arange(8 ** 4)
    positions = 2 * ((every.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9])) & 7) + 1          # (4096, 4)
    distances = ((2 * levels + 1).unsqueeze(0) - positions.unsqueeze(1)).pow(2).sum(-1)   # (4096, G)
    order = torch.sort(distances, dim=-1, stable=True).indices                             # by distance, then index
    sorted_distances = distances.gather(-1, order)
    # A point's neighbours: every grid point at one of the ``nwant`` smallest distances.
    rank = torch.cat([torch.zeros_like(sorted_distances[:, :1]),
                      (sorted_distances[:, 1:] > sorted_distances[:, :-1]).long()], dim=-1).cumsum(-1)
    keep = rank < nwant
    width = int(keep.sum(-1).max())
    neighbours = torch.where(keep, order, torch.full_like(order, -1))[:, :width]
    return levels, grid_map, neighbours


def best_neighbours(levels: torch.Tensor, xval: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    candidates: torch.Tensor) -> torch.Tensor:
    """llama.cpp's iq3_find_best_neighbour for groups (n, 4): among ``candidates`` (n, M), -1 padded, the
    first grid point minimizing sum(weight * (scale * (2l + 1) - x)^2), summed left to right."""
    points = (2 * levels[candidates.clamp(min=0)] + 1).to(torch.float32)       # (n, M, 4)
    diff = scale.unsqueeze(-1) * points - xval.unsqueeze(1)
    d2 = sequential_sum(weight.unsqueeze(1) * diff * diff).squeeze(-1)
    d2 = torch.where(candidates >= 0, d2, torch.full_like(d2, float("inf")))
    return candidates.gather(-1, d2.argmin(dim=-1, keepdim=True)).squeeze(-1)


class _Lattice3(GGMLType):
    """Shared by the 3-bit lattice types: groups of 4 levels 0..7 (magnitudes 2l + 1) on a grid, found by
    llama.cpp's search over inverse scales (15 + 0.2 k) / max per sub-block of 32."""

    block_size = QK_K
    fp16_offsets = (0,)
    takes_importance = True
    nwant: ClassVar[int]             # neighbours: the grid points at this many smallest distances
    steps: ClassVar[int]             # k = -steps..steps
    empty_below: ClassVar[float]     # a sub-block whose largest magnitude is below this stays zero
    # IQ3_XXS: groups start "on the grid" (no second rounding unless a tried scale moved one), and the
    # second rounding redoes only the groups that moved; IQ3_S redoes all of them.
    starts_on_grid: ClassVar[bool]

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lattice(self.name, self.nwant)

    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """(n, 256) element weights: x^2, or importance * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2)."""
        if importance is None:
            return x * x
        sigma2 = 2 * sequential_sum(x * x) / QK_K
        return importance * exact_sqrt(sigma2 + x * x)

    def _search(self, xval: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sub-block (rows of 32): (grid index of each group of 4 (rows, 8), scale (rows, 1), empty
        (rows, 1)), by llama.cpp's search."""
        grid_levels, grid_map, neighbours = (t.to(xval.device) for t in self.tables())
        rows = xval.shape[0]
        waux = exact_sqrt(weight)
        peak = xval.amax(dim=-1, keepdim=True)
        empty = ~(peak >= self.empty_below) if self.empty_below > 0 else peak == 0
        safe_peak = torch.where(empty, torch.ones_like(peak), peak)
        shifts = torch.tensor([0, 3, 6, 9], device=xval.device)

        def snap(levels: torch.Tensor, scale: torch.Tensor, redo: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            """(levels on the grid, on-grid flags (rows, 8)) for rounded levels under ``scale``; only the
            groups ``redo`` marks move (all by default)."""
            groups = levels.reshape(-1, 8, 4)
            index = grid_map[(groups << shifts).sum(-1)]
            off = index < 0
            moved = off if redo is None else off & redo
            if bool(moved.any()):
                at_row, at_group = moved.nonzero(as_tuple=True)
                codes = (groups[at_row, at_group] << shifts).sum(-1)
                chosen = best_neighbours(grid_levels, xval.reshape(-1, 8, 4)[at_row, at_group],
                                         waux.reshape(-1, 8, 4)[at_row, at_group], scale[at_row], neighbours[codes])
                groups = groups.clone()
                groups[at_row, at_group] = grid_levels[chosen]
            return groups.reshape(-1, 32), ~off

        def sums(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = (2 * levels + 1).to(torch.float32)
            return sequential_sum(weight * xval * q), sequential_sum(weight * q * q)

        def rounded(inverse: torch.Tensor) -> torch.Tensor:
            return nearest_int(0.5 * (inverse * xval - 1)).clamp(0, 7).long()

        best = torch.zeros_like(peak)
        scale = peak / 15
        chosen = torch.zeros_like(xval, dtype=torch.long)
        on_grid = torch.full((rows, 8), self.starts_on_grid, dtype=torch.bool, device=xval.device)
        for step in range(-self.steps, self.steps + 1):
            inverse = (15 + step * torch.tensor(0.2, dtype=torch.float32)) / safe_peak
            levels, flags = snap(rounded(inverse), 1 / inverse)
            sum_qx, sum_q2 = sums(levels)
            better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
            scale = torch.where(better, sum_qx / torch.where(better, sum_q2, torch.ones_like(sum_q2)), scale)
            best = torch.where(better, scale * sum_qx, best)
            chosen = torch.where(better, levels, chosen)
            on_grid = torch.where(better, flags, on_grid)
        # Some group left its rounded levels for a neighbour: round again at the chosen scale, refit.
        again = (~on_grid).any(-1, keepdim=True) & (scale > 0) & ~empty
        if bool(again.any()):
            safe_scale = torch.where(again, scale, torch.ones_like(scale))
            levels, _ = snap(rounded(1 / safe_scale), safe_scale, None if not self.starts_on_grid else ~on_grid)
            if self.starts_on_grid:    # the groups that stayed on the grid keep their levels
                keep = on_grid.repeat_interleave(4, dim=-1)
                levels = torch.where(keep, chosen, levels)
            sum_qx, sum_q2 = sums(levels)
            chosen = torch.where(again, levels, chosen)
            refit = again & (sum_q2 > 0)
            scale = torch.where(refit, sum_qx / torch.where(refit, sum_q2, torch.ones_like(sum_q2)), scale)
        scale = torch.where(empty, torch.zeros_like(scale), scale)
        index = grid_map[(chosen.reshape(-1, 8, 4) << shifts).sum(-1)]
        return torch.where(empty, torch.zeros_like(index), index), scale, empty


@register
class IQ3_S(_Lattice3):
    """3.4375 bits per weight: per super-block an fp16 d; per sub-block of 32 a 4-bit scale s
    (d * (1 + 2s)), 8 grid indices of 9 bits (the low bytes in qs, the ninth bits in qh) and 32 sign bits.
    Layout: d (2 bytes), qs (64), qh (8), signs (32), scales (4)."""

    name = "IQ3_S"
    type_size = 110
    file_type = "MOSTLY_IQ3_S"
    fallback = "IQ4_NL"
    nwant = 3
    steps = 9
    empty_below = 0.0
    starts_on_grid = False

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        x = blocks.to(torch.float32)
        n = x.shape[0]
        weight = self._weights(x, importance).reshape(n * 8, 32)
        subs = x.reshape(n * 8, 32)
        xval = torch.where(subs >= 0, subs, -subs)
        sign_bits = pack_bits((subs < 0).to(torch.uint8))                                   # (n*8, 4)
        index, scale, empty = self._search(xval, weight)
        return self._pack(n, index, sign_bits, scale.reshape(n, 8), empty.reshape(n, 8))

    def _pack(self, n: int, index: torch.Tensor, sign_bits: torch.Tensor, scales: torch.Tensor,
              empty: torch.Tensor) -> torch.Tensor:
        # llama.cpp skips an all-zero sub-block before advancing its qs and signs pointers: the following
        # sub-blocks' low bytes and signs move up (its qh bits stay in place), as the bytes it writes.
        slot = (~empty).long().cumsum(-1) - 1 + torch.arange(n, device=index.device).unsqueeze(-1) * 8
        slot = torch.where(empty, torch.full_like(slot, n * 8), slot).reshape(-1)          # dropped: past the end
        low = torch.zeros((n * 8 + 1, 8), dtype=torch.uint8, device=index.device)
        low[slot] = (index & 0xFF).to(torch.uint8)
        signs = torch.zeros((n * 8 + 1, 4), dtype=torch.uint8, device=index.device)
        signs[slot] = sign_bits
        high = pack_bits((index >> 8).to(torch.uint8).reshape(n, 64))                       # (n, 8)
        max_scale = scales.amax(dim=-1, keepdim=True)
        d = max_scale / 31
        inverse = 1 / torch.where(max_scale > 0, d, torch.ones_like(d))
        codes = nearest_int(0.5 * (inverse * scales - 1)).clamp(0, 15).to(torch.uint8)
        codes = torch.where(max_scale > 0, codes, torch.zeros_like(codes))
        stored = torch.where(max_scale > 0, d * torch.tensor(1.033, dtype=torch.float32), torch.zeros_like(d))
        return torch.cat([fp16_bytes(stored), low[:-1].reshape(n, 64), high, signs[:-1].reshape(n, 32),
                          codes[:, 0::2] | (codes[:, 1::2] << 4)], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        grid_levels = self.tables()[0].to(blocks.device)
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        index = blocks[:, 2:66].long() | (unpack_bits(blocks[:, 66:74]).long() << 8)          # (n, 64)
        magnitudes = (2 * grid_levels[index] + 1).to(torch.float32).reshape(n, 8, 32)
        negative = unpack_bits(blocks[:, 74:106]).reshape(n, 8, 32).bool()
        codes = torch.stack([blocks[:, 106:110] & 0x0F, blocks[:, 106:110] >> 4], dim=-1).reshape(n, 8, 1)
        sub_scale = d.unsqueeze(-1) * (1 + 2 * codes.to(torch.float32))
        return (sub_scale * torch.where(negative, -magnitudes, magnitudes)).reshape(n, QK_K)




def _parity_sign_bits(signs7: torch.Tensor) -> torch.Tensor:
    """7 stored sign bits -> the 8 signs of a group (..., 8) bool: the eighth makes the count even."""
    bits = (signs7.unsqueeze(-1) >> torch.arange(7, device=signs7.device)) & 1
    return torch.cat([bits, bits.sum(-1, keepdim=True) & 1], dim=-1).bool()


@register
class IQ3_XXS(_Lattice3):
    """3.0625 bits per weight: per super-block an fp16 d; per sub-block of 32 eight 8-bit grid indices and
    a 32-bit word of four 7-bit sign groups (the eighth sign of each group of 8 makes its count of negatives
    even) and a 4-bit scale s (d * (0.5 + s) / 2). Layout: d (2 bytes), qs (64), words (32)."""

    name = "IQ3_XXS"
    type_size = 98
    file_type = "MOSTLY_IQ3_XXS"
    fallback = "IQ4_NL"
    nwant = 2
    steps = 15
    empty_below = 1e-8
    starts_on_grid = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        x = blocks.to(torch.float32)
        n = x.shape[0]
        weight = self._weights(x, importance).reshape(n * 8, 32)
        groups = x.reshape(n * 8, 4, 8)
        negative = groups < 0
        xval = torch.where(groups >= 0, groups, -groups)
        # An odd count of negatives: the element that costs least to flip (smallest w * x * x, the first)
        # takes the other sign, so the eighth sign bit need not be stored.
        odd = (negative.sum(-1, keepdim=True) % 2) == 1
        cost = weight.reshape(n * 8, 4, 8) * groups * groups
        flip = odd & (torch.arange(8, device=x.device) == cost.argmin(dim=-1, keepdim=True))
        xval = torch.where(flip, -xval, xval)
        signs = (negative ^ flip).to(torch.int64)
        index, scale, empty = self._search(xval.reshape(n * 8, 32), weight)
        words = (signs[..., :7] << torch.arange(7, device=x.device)).sum(-1)                     # (n*8, 4)
        words = torch.where(scale < 0, ~words & 127, words)
        scale = scale.abs()
        words = (words << torch.tensor([0, 7, 14, 21], device=x.device)).sum(-1).reshape(n, 8)
        scales = scale.reshape(n, 8)
        max_scale = scales.amax(dim=-1, keepdim=True)
        d = max_scale / 31
        inverse = 1 / torch.where(max_scale > 0, d, torch.ones_like(d))
        codes = nearest_int(0.5 * (inverse * scales - 1)).clamp(0, 15).to(torch.int64)
        words = words | (codes << 28)
        live = max_scale > 0
        stored = torch.where(live, d * torch.tensor(1.0125, dtype=torch.float32), torch.zeros_like(d))
        words = torch.where(live, words, torch.zeros_like(words))
        low = torch.where(live, index.reshape(n, 64), torch.zeros_like(index.reshape(n, 64))).to(torch.uint8)
        word_bytes = ((words.unsqueeze(-1) >> torch.tensor([0, 8, 16, 24], device=x.device)) & 0xFF).to(torch.uint8)
        return torch.cat([fp16_bytes(stored), low, word_bytes.reshape(n, 32)], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        values = grid_values(self.name).to(blocks.device)
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        words = blocks[:, 66:98].reshape(n, 8, 4).to(torch.int64)
        words = (words << torch.tensor([0, 8, 16, 24], device=blocks.device)).sum(-1)          # (n, 8)
        sub_scale = d * (0.5 + (words >> 28).to(torch.float32)) * 0.5
        negative = _parity_sign_bits((words.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127)
        magnitudes = values[blocks[:, 2:66].long()].reshape(n, 8, 4, 8)
        signed = torch.where(negative.reshape(n, 8, 4, 8), -magnitudes, magnitudes)
        return (sub_scale.reshape(n, 8, 1, 1) * signed).reshape(n, QK_K)
