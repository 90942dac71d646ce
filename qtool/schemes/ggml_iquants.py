"""GGML's lattice i-quants: groups of 4 or 8 magnitudes that must form a point of a fixed grid, their
signs apart, under 4-bit sub-block scales in super-blocks of 256 (llama.cpp's IQ3_S, IQ3_XXS, IQ2_S,
IQ2_XS, IQ2_XXS).

The grids are llama.cpp's (gguf-py's tables, the facts its dequantizer reads); a group whose rounded
levels are not a grid point takes the grid neighbour nearest by importance-weighted distance, from the
neighbour lists llama.cpp builds (``iq3xs_init_impl`` / ``iq2xs_init_impl``: every grid point at the
``nwant`` smallest distances, in order of distance then index). Each sub-block's scale comes from
llama.cpp's search over inverse scales; the sums run in its order (left to right in float32), so the
bytes equal libggml's (tests/test_ggml.py), with or without an importance matrix.
"""
from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch

from qtool.schemes.base import register
from qtool.schemes.ggml import QK_K, GGMLType, divide, fp16_bytes, fp16_from_bytes, pack_bits, unpack_bits
from qtool.schemes.ggml_search import exact_sqrt, nearest_int, sequential_sum


@functools.cache
def grid_values(type_name: str) -> torch.Tensor:
    """The dequantized magnitudes of a type's grid points, (G, 4 or 8) float32: gguf-py's table."""
    import gguf.quants

    table = getattr(gguf.quants, type_name)
    table.init_grid()
    return torch.from_numpy(np.asarray(table.grid).reshape(table.grid_shape).copy())


def code_bits(m: int) -> int:
    """Bits a level takes in the code of a group of m (levels 0..7 in groups of 4, 0..2 in groups of 8)."""
    return 3 if m == 4 else 2


def group_codes(levels: torch.Tensor) -> torch.Tensor:
    """Groups of levels (..., m) -> their codes (...,): sum of l_i << bits * i, the grid map's index."""
    m = levels.shape[-1]
    return (levels << (torch.arange(m, device=levels.device) * code_bits(m))).sum(-1)


@functools.cache
def lattice(type_name: str, nwant: int, kmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels (G, m) int64 of the grid points, level l standing for the magnitude 2l + 1; map from a group's
    code (sum of l_i << bits * i) to its grid index, -1 off the grid; neighbours (codes, M) int64: the grid
    points llama.cpp tries for an off-grid group of levels below ``kmax``, in its order, -1 padded)."""
    values = grid_values(type_name).numpy()
    m = values.shape[1]
    levels = torch.from_numpy(np.searchsorted(np.unique(values), values)).long()     # magnitude rank = l
    grid_map = torch.full((1 << (code_bits(m) * m),), -1, dtype=torch.long)
    grid_map[group_codes(levels)] = torch.arange(len(levels))
    # Every group rounding can produce: levels 0..kmax-1 in each place.
    reachable = torch.cartesian_prod(*[torch.arange(kmax)] * m).flip(-1)    # (kmax^m, m), place 0 fastest
    codes = group_codes(reachable)
    grid_positions = 2 * levels + 1
    lists = []
    for start in range(0, len(codes), 2048):
        positions = 2 * reachable[start:start + 2048] + 1
        distances = (grid_positions.unsqueeze(0) - positions.unsqueeze(1)).pow(2).sum(-1)      # (c, G)
        order = torch.sort(distances, dim=-1, stable=True).indices                               # distance, then index
        ranked = distances.gather(-1, order)
        rank = torch.cat([torch.zeros_like(ranked[:, :1]), (ranked[:, 1:] > ranked[:, :-1]).long()], -1).cumsum(-1)
        lists.append(torch.where(rank < nwant, order, torch.full_like(order, -1)))
    table = torch.cat(lists)
    width = int((table >= 0).sum(-1).max())
    neighbours = torch.full((len(grid_map), width), -1, dtype=torch.long)
    neighbours[codes] = table[:, :width]
    return levels, grid_map, neighbours


@functools.cache
def lattice_int32(type_name: str, nwant: int, kmax: int) -> tuple[torch.Tensor, ...]:
    """:func:`lattice`'s tables as IQ1's C kernel reads them (contiguous int32), made once."""
    return tuple(table.to(torch.int32).contiguous() for table in lattice(type_name, nwant, kmax))


@functools.cache
def lattice_packed(type_name: str, nwant: int, kmax: int) -> tuple[torch.Tensor, ...]:
    """:func:`lattice`'s tables as cpu_ggml.c's lattice_fit reads them, made once: (grid map int32; the
    row of each code in the lists, -1 for codes rounding never gives (a level of kmax or more); each
    row's neighbour count; the rows: each neighbour as its packed code (levels << bits * i) in uint16,
    padded to a multiple of 8 neighbours with the last one). Packed codes let the kernel read a
    neighbour's levels without gathering grid rows; rows for reachable codes only keep the lists small
    (IQ2_S: 5 MB)."""
    # Built afresh, not through lattice's cache: its neighbour table (int64, a row for every code:
    # IQ2_S 215 MB) would stay alive beside these rows for the whole run.
    levels, grid_map, neighbours = lattice.__wrapped__(type_name, nwant, kmax)
    grid_codes = group_codes(levels)
    rows = (neighbours[:, 0] >= 0).nonzero().squeeze(-1)
    listed = neighbours[rows]
    code_rows = torch.full((len(grid_map),), -1, dtype=torch.int32)
    code_rows[rows] = torch.arange(len(rows), dtype=torch.int32)
    counts = (listed >= 0).sum(-1)
    width = -(-listed.shape[1] // 8) * 8
    # Padded with copies of the row's last neighbour: an equal distance at a later place never wins.
    last = listed.gather(-1, (counts - 1).unsqueeze(-1))
    padded = torch.cat([listed, last.expand(-1, width - listed.shape[1])], -1)
    padded = torch.where(padded >= 0, padded, last)
    return (grid_map.to(torch.int32).contiguous(), code_rows, counts.to(torch.int32).contiguous(),
            grid_codes[padded].to(torch.uint16).contiguous())


def best_neighbours(levels: torch.Tensor, xval: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    candidates: torch.Tensor) -> torch.Tensor:
    """llama.cpp's iq*_find_best_neighbour for groups (n, m): among ``candidates`` (n, M), -1 padded, the
    first grid point minimizing sum(weight * (scale * (2l + 1) - x)^2), summed left to right."""
    points = (2 * levels[candidates.clamp(min=0)] + 1).to(torch.float32)       # (n, M, m)
    diff = scale.unsqueeze(-1) * points - xval.unsqueeze(1)
    d2 = sequential_sum(weight.unsqueeze(1) * diff * diff).squeeze(-1)
    d2 = torch.where(candidates >= 0, d2, torch.full_like(d2, float("inf")))
    return candidates.gather(-1, d2.argmin(dim=-1, keepdim=True)).squeeze(-1)


def even_signs(groups: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of 8 whose count of negatives must be even (the eighth sign is not stored): (magnitudes, with
    the element that costs least to flip (smallest w * x * x, the first) negated where the count is odd;
    its 7 stored sign bits as an int64 (...))."""
    negative = groups < 0
    xval = torch.where(groups >= 0, groups, -groups)
    odd = (negative.sum(-1, keepdim=True) % 2) == 1
    cost = weight * groups * groups
    flip = odd & (torch.arange(8, device=groups.device) == cost.argmin(dim=-1, keepdim=True))
    signs = (negative ^ flip).to(torch.int64)
    return torch.where(flip, -xval, xval), (signs[..., :7] << torch.arange(7, device=groups.device)).sum(-1)


def parity_signs(signs7: torch.Tensor) -> torch.Tensor:
    """7 stored sign bits -> the 8 signs of a group (..., 8) bool: the eighth makes the count even."""
    bits = (signs7.unsqueeze(-1) >> torch.arange(7, device=signs7.device)) & 1
    return torch.cat([bits, bits.sum(-1, keepdim=True) & 1], dim=-1).bool()


def qp_quants(x: torch.Tensor, weight: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qp_quants for rows (r, n) of non-negative-ish values: (scale (r, 1), levels (r, n)):
    the best of 9 inverse scales, then 5 rounds of per-element level changes that raise the weighted fit.
    Its levels live in uint8 (a negative level wraps to 256 + l where it is stored and read back), as
    here; a row below 1e-15 gets scale and levels 0."""
    peak = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    safe_peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    iscale = torch.tensor(float(nmax)) / safe_peak
    stored = nearest_int(iscale * x) % 256                     # L[i] = nearest_int(...): uint8
    scale = 1 / iscale
    best = sequential_sum(weight * (x - scale * stored) * (x - scale * stored))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (torch.tensor(0.1, dtype=torch.float32) * step + nmax) / safe_peak
        levels = torch.clamp(nearest_int(trial * x), max=nmax)
        diff = x - (1 / trial) * levels
        mse = sequential_sum(weight * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, trial, iscale)
    levels = torch.clamp(nearest_int(iscale * x), max=nmax)
    sum_lx = sequential_sum(weight * x * levels)
    sum_l2 = sequential_sum(weight * levels * levels)
    stored = levels % 256
    active = torch.ones_like(peak, dtype=torch.bool)
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(x.shape[-1]):
            w, xi, li = weight[:, i:i + 1], x[:, i:i + 1], stored[:, i:i + 1]
            slx = sum_lx - w * xi * li
            sl2 = sum_l2 - w * li * li
            ok = active & (slx > 0) & (sl2 > 0)
            new = torch.clamp(nearest_int(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))), max=nmax)
            moved = ok & (new != li)
            slx_new = slx + w * xi * new
            sl2_new = sl2 + w * new * new
            take = moved & (slx_new * slx_new * sum_l2 > sum_lx * sum_lx * sl2_new)
            stored[:, i:i + 1] = torch.where(take, new % 256, li)
            sum_lx = torch.where(take, slx_new, sum_lx)
            sum_l2 = torch.where(take, sl2_new, sum_l2)
            changed = changed | take
        active = active & changed
        if not bool(active.any()):
            break
    result = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                         torch.zeros_like(sum_l2))
    nonzero = peak >= 1e-15
    return torch.where(nonzero, result, torch.zeros_like(result)), torch.where(nonzero, stored, 0)


class _Lattice(GGMLType):
    """The lattice types' shared search: per sub-block, levels 0..kmax-1 (magnitudes 2l + 1) rounded at
    inverse scales (2 kmax - 1 + k * step) / max, each group snapped to the grid, the best weighted fit
    kept, then (``redo``) the groups rounded again at the chosen scale and the scale refit."""

    block_size = QK_K
    fp16_offsets = (0,)
    takes_importance = True
    sub: ClassVar[int]               # elements per sub-block scale
    group: ClassVar[int]             # elements per grid point
    kmax: ClassVar[int]              # levels per element
    nwant: ClassVar[int]             # neighbours: the grid points at this many smallest distances
    steps: ClassVar[int]             # k = -steps..steps
    step_size: ClassVar[float]
    empty_below: ClassVar[float]     # a sub-block whose largest magnitude is below this stays zero
    sigma2_factor: ClassVar[int]     # sigma2 = factor * mean(x^2) in the importance weights
    # After the search, which groups are rounded again at the chosen scale: "all" whenever one left the
    # grid (IQ3_S), "off" only those (IQ3_XXS, IQ2_XS, IQ2_S), "always" all of them (IQ2_XXS).
    redo: ClassVar[str]
    fudge: ClassVar[float]           # the stored d is max_scale / 31 times this
    even_signs: ClassVar[bool] = False    # groups of 8 signs stored as 7 bits, the count of negatives made even
    qp_start: ClassVar[bool] = False      # the search starts from make_qp_quants' scale (IQ2_XXS)
    flat_weights: ClassVar[bool] = False  # without an importance matrix: sigma2 / 4 + x^2 (IQ2_S), not x^2

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lattice(self.name, self.nwant, self.kmax)

    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """(n, 256) element weights: importance * sqrt(sigma2 + x^2), or without an importance matrix x^2
        (``flat_weights``: sigma2 / 4 + x^2); sigma2 = sigma2_factor * mean(x^2)."""
        if importance is None and not self.flat_weights:
            return x * x
        sigma2 = self.sigma2_factor * sequential_sum(x * x) / QK_K
        if importance is None:
            return 0.25 * sigma2 + x * x
        return importance * exact_sqrt(sigma2 + x * x)

    def _first_scale(self, xval: torch.Tensor, weight: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """The scale the search starts from and whose magnitude it scans around."""
        if self.qp_start:
            return qp_quants(xval, weight, self.kmax + 1)[0]
        return divide(peak, 2 * self.kmax - 1)

    def _search(self, xval: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sub-block (rows of ``sub``): (grid index of each group (rows, sub / group), scale (rows, 1),
        empty (rows, 1)), by llama.cpp's search."""
        grid_levels, grid_map, neighbours = (t.to(xval.device) for t in self.tables())
        rows, groups_per_row, m = xval.shape[0], self.sub // self.group, self.group
        waux = exact_sqrt(weight)
        peak = xval.amax(dim=-1, keepdim=True)
        empty = ~(peak >= self.empty_below) if self.empty_below > 0 else peak == 0
        scale = self._first_scale(xval, weight, torch.where(empty, torch.ones_like(peak), peak))
        span = scale * self.kmax if self.qp_start else peak      # what the inverse scales divide
        empty = empty | ~(span > 0)
        span = torch.where(empty, torch.ones_like(span), span)

        def snap(levels: torch.Tensor, scale: torch.Tensor, redo: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            """(levels on the grid, on-grid flags (rows, groups)); only the groups ``redo`` marks move."""
            groups = levels.reshape(rows, groups_per_row, m)
            index = grid_map[group_codes(groups)]
            off = index < 0
            moved = off if redo is None else off & redo
            if bool(moved.any()):
                at_row, at_group = moved.nonzero(as_tuple=True)
                codes = group_codes(groups[at_row, at_group])
                chosen = best_neighbours(grid_levels, xval.reshape(rows, groups_per_row, m)[at_row, at_group],
                                         waux.reshape(rows, groups_per_row, m)[at_row, at_group], scale[at_row],
                                         neighbours[codes])
                groups = groups.clone()
                groups[at_row, at_group] = grid_levels[chosen]
            return groups.reshape(rows, -1), ~off

        def sums(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = (2 * levels + 1).to(torch.float32)
            return sequential_sum(weight * xval * q), sequential_sum(weight * q * q)

        def rounded(inverse: torch.Tensor) -> torch.Tensor:
            return nearest_int(0.5 * (inverse * xval - 1)).clamp(0, self.kmax - 1).long()

        best = torch.zeros_like(peak)
        chosen = torch.zeros_like(xval, dtype=torch.long)
        on_grid = torch.full((rows, groups_per_row), self.redo != "all", dtype=torch.bool, device=xval.device)
        for step in range(-self.steps, self.steps + 1):
            inverse = (2 * self.kmax - 1 + step * torch.tensor(self.step_size, dtype=torch.float32)) / span
            levels, flags = snap(rounded(inverse), 1 / inverse)
            sum_qx, sum_q2 = sums(levels)
            better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
            scale = torch.where(better, sum_qx / torch.where(better, sum_q2, torch.ones_like(sum_q2)), scale)
            best = torch.where(better, scale * sum_qx, best)
            chosen = torch.where(better, levels, chosen)
            on_grid = torch.where(better, flags, on_grid)
        again = (scale > 0) & ~empty
        if self.redo != "always":
            again = again & (~on_grid).any(-1, keepdim=True)
        if bool(again.any()):
            safe_scale = torch.where(again, scale, torch.ones_like(scale))
            only_off = self.redo == "off"
            levels, _ = snap(rounded(1 / safe_scale), safe_scale, ~on_grid if only_off else None)
            if only_off:    # the groups that stayed on the grid keep their levels
                levels = torch.where(on_grid.repeat_interleave(m, dim=-1), chosen, levels)
            sum_qx, sum_q2 = sums(levels)
            chosen = torch.where(again, levels, chosen)
            refit = again & (sum_q2 > 0)
            scale = torch.where(refit, sum_qx / torch.where(refit, sum_q2, torch.ones_like(sum_q2)), scale)
        scale = torch.where(empty, torch.zeros_like(scale), scale)
        index = grid_map[group_codes(chosen.reshape(rows, groups_per_row, m))]
        return torch.where(empty, torch.zeros_like(index), index), scale, empty

    def _super_scales(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, subs) sub-block scales -> (stored fp16 d bytes, 4-bit codes (n, subs) int64, live (n, 1)):
        d = max / 31 (times the type's fudge when stored), code = round((scale / d - 1) / 2) in 0..15."""
        max_scale = scales.amax(dim=-1, keepdim=True)
        live = max_scale > 0
        d = divide(max_scale, 31)
        inverse = 1 / torch.where(live, d, torch.ones_like(d))
        codes = nearest_int(0.5 * (inverse * scales - 1)).clamp(0, 15).to(torch.int64)
        stored = d * torch.tensor(self.fudge, dtype=torch.float32) if self.fudge != 1 else d
        stored = torch.where(live, stored, torch.zeros_like(d))
        return fp16_bytes(stored), torch.where(live, codes, torch.zeros_like(codes)), live

    def _sign_groups(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(magnitudes the search fits (n * subs, sub), the sign bits it stores per 8 elements)."""
        rows = x.shape[0] * (QK_K // self.sub)
        if not self.even_signs:
            subs = x.reshape(rows, self.sub)
            return torch.where(subs >= 0, subs, -subs), pack_bits((subs < 0).to(torch.uint8)).to(torch.int64)
        xval, signs = even_signs(x.reshape(rows, -1, 8), weight.reshape(rows, -1, 8))
        return xval.reshape(rows, self.sub), signs

    def _fit(self, blocks: torch.Tensor, importance: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grid indices (n * subs, groups), sign bits per group, scales (n * subs, 1), empty (n * subs, 1));
        on the CPU by the C kernel (the same numbers), else by the torch code below."""
        fitted = self._fit_in_c(blocks, importance) if blocks.device.type == "cpu" else None
        if fitted is not None:
            index, signs, scale, empty = fitted
        else:
            x = blocks.to(torch.float32)
            weight = self._weights(x, importance)
            xval, signs = self._sign_groups(x, weight)
            index, scale, empty = self._search(xval, weight.reshape(xval.shape))
        # llama.cpp leaves an empty sub-block's bytes as it cleared them: no signs either.
        return index, torch.where(empty, torch.zeros_like(signs), signs), scale, empty


    def _fit_in_c(self, blocks: torch.Tensor, importance: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        from qtool.kernels.cpu import lattice_fit

        redo = {"all": 0, "off": 1, "always": 2}[self.redo]
        config = (self.sub, self.group, self.kmax, self.steps, self.sigma2_factor, redo, int(self.even_signs),
                  int(self.qp_start), int(self.flat_weights))
        fitted = lattice_fit(blocks, importance, config, (self.step_size, self.empty_below),
                             lattice_packed(self.name, self.nwant, self.kmax))
        if fitted is None:
            return None
        index, signs, scale, empty = fitted
        return index, signs.reshape(scale.shape[0], -1), scale, empty


class _EvenSignLattice(_Lattice):
    """Types whose groups of 8 signs store 7 bits (the count of negatives made even): a sub-block whose
    scale came out negative flips every stored sign and the scale."""

    even_signs = True

    def _fit(self, blocks: torch.Tensor, importance: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index, signs, scale, empty = super()._fit(blocks, importance)
        signs = torch.where(scale < 0, ~signs & 127, signs)
        return index, signs, scale.abs(), empty


def _words(fields: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    return (fields << torch.tensor(shifts, device=fields.device)).sum(-1)


def _le_bytes(words: torch.Tensor, width: int) -> torch.Tensor:
    """int64 (n, k) -> their little-endian bytes (n, k * width) uint8."""
    shifts = torch.arange(width, device=words.device) * 8
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(words.shape[0], -1)


def _from_le(raw: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 (n, k * width) -> int64 (n, k): the inverse of _le_bytes."""
    parts = raw.reshape(raw.shape[0], -1, width).to(torch.int64)
    return (parts << (torch.arange(width, device=raw.device) * 8)).sum(-1)


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _nibbles(raw: torch.Tensor) -> torch.Tensor:
    return torch.stack([raw & 0x0F, raw >> 4], dim=-1).reshape(raw.shape[0], -1).to(torch.float32)


@register
class IQ3_S(_Lattice):
    """3.4375 bits per weight: per super-block an fp16 d; per sub-block of 32 a 4-bit scale s
    (d * (1 + 2s)), 8 grid indices of 9 bits (the low bytes in qs, the ninth bits in qh) and 32 sign bits.
    Layout: d (2 bytes), qs (64), qh (8), signs (32), scales (4)."""

    name = "IQ3_S"
    type_size = 110
    file_type = "MOSTLY_IQ3_S"
    fallback = "IQ4_NL"
    sub, group, kmax, nwant, steps, step_size = 32, 4, 8, 3, 9, 0.2
    empty_below, sigma2_factor, redo, fudge = 0.0, 2, "all", 1.033

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        index, signs, scale, empty = self._fit(blocks, importance)
        d, codes, _ = self._super_scales(scale.reshape(n, 8))
        # llama.cpp skips an all-zero sub-block before advancing its qs and signs pointers: the following
        # sub-blocks' low bytes and signs move up (their qh bits stay in place), as the bytes it writes.
        empty = empty.reshape(n, 8)
        slot = (~empty).long().cumsum(-1) - 1 + torch.arange(n, device=index.device).unsqueeze(-1) * 8
        slot = torch.where(empty, torch.full_like(slot, n * 8), slot).reshape(-1)          # dropped: past the end
        low = torch.zeros((n * 8 + 1, 8), dtype=torch.uint8, device=index.device)
        low[slot] = (index & 0xFF).to(torch.uint8)
        sign_bytes = torch.zeros((n * 8 + 1, 4), dtype=torch.uint8, device=index.device)
        sign_bytes[slot] = signs.to(torch.uint8)
        high = pack_bits((index >> 8).to(torch.uint8).reshape(n, 64))
        return torch.cat([d, low[:-1].reshape(n, 64), high, sign_bytes[:-1].reshape(n, 32), _nibble_pairs(codes)], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        index = blocks[:, 2:66].long() | (unpack_bits(blocks[:, 66:74]).long() << 8)
        magnitudes = grid_values(self.name).to(blocks.device)[index].reshape(n, 8, 32)
        negative = unpack_bits(blocks[:, 74:106]).reshape(n, 8, 32).bool()
        sub_scale = (d * (1 + 2 * _nibbles(blocks[:, 106:110]))).unsqueeze(-1)
        return (sub_scale * torch.where(negative, -magnitudes, magnitudes)).reshape(n, QK_K)


@register
class IQ3_XXS(_EvenSignLattice):
    """3.0625 bits per weight: per super-block an fp16 d; per sub-block of 32 eight 8-bit grid indices and a
    32-bit word of four 7-bit sign groups and a 4-bit scale s (d * (0.5 + s) / 2). Layout: d (2 bytes),
    qs (64), words (32)."""

    name = "IQ3_XXS"
    type_size = 98
    file_type = "MOSTLY_IQ3_XXS"
    fallback = "IQ4_NL"
    sub, group, kmax, nwant, steps, step_size = 32, 4, 8, 2, 15, 0.2
    empty_below, sigma2_factor, redo, fudge = 1e-8, 2, "off", 1.0125

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        index, signs, scale, _ = self._fit(blocks, importance)
        d, codes, live = self._super_scales(scale.reshape(n, 8))
        words = _words(signs, (0, 7, 14, 21)).reshape(n, 8) | (codes << 28)
        quants = torch.cat([index.reshape(n, 64).to(torch.uint8), _le_bytes(words, 4)], -1)
        return torch.cat([d, torch.where(live, quants, torch.zeros_like(quants))], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        words = _from_le(blocks[:, 66:98], 4)                                                 # (n, 8)
        sub_scale = d * (0.5 + (words >> 28).to(torch.float32)) * 0.5
        negative = parity_signs((words.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127)
        magnitudes = grid_values(self.name).to(blocks.device)[blocks[:, 2:66].long()].reshape(n, 8, 4, 8)
        signed = torch.where(negative.reshape(n, 8, 4, 8), -magnitudes, magnitudes)
        return (sub_scale.reshape(n, 8, 1, 1) * signed).reshape(n, QK_K)


@register
class IQ2_XXS(_EvenSignLattice):
    """2.0625 bits per weight, needs an importance matrix: per super-block an fp16 d; per sub-block of 32
    four 8-bit grid indices (groups of 8 levels 0..2) in one 32-bit word, and four 7-bit sign groups with a
    4-bit scale s (d * (0.5 + s) / 4) in another. The search starts from make_qp_quants' scale."""

    name = "IQ2_XXS"
    type_size = 66
    file_type = "MOSTLY_IQ2_XXS"
    fallback = "IQ4_NL"
    requires_importance = True
    sub, group, kmax, nwant, steps, step_size = 32, 8, 3, 2, 6, 0.1
    empty_below, sigma2_factor, redo, fudge = 1e-15, 1, "always", 1.0

    qp_start = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        index, signs, scale, _ = self._fit(blocks, importance)
        d, codes, live = self._super_scales(scale.reshape(n, 8))
        grid_words = _words(index.reshape(n * 8, 4), (0, 8, 16, 24)).reshape(n, 8)
        sign_words = _words(signs, (0, 7, 14, 21)).reshape(n, 8) | (codes << 28)
        quants = _le_bytes(torch.stack([grid_words, sign_words], -1).reshape(n, 16), 4)
        return torch.cat([d, torch.where(live, quants, torch.zeros_like(quants))], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        words = _from_le(blocks[:, 2:66], 4).reshape(n, 8, 2)
        index = (words[..., 0:1] >> torch.tensor([0, 8, 16, 24], device=blocks.device)) & 0xFF       # (n, 8, 4)
        sub_scale = d * (0.5 + (words[..., 1] >> 28).to(torch.float32)) * 0.25
        negative = parity_signs((words[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127)
        magnitudes = grid_values(self.name).to(blocks.device)[index]                              # (n, 8, 4, 8)
        signed = torch.where(negative, -magnitudes, magnitudes)
        return (sub_scale.reshape(n, 8, 1, 1) * signed).reshape(n, QK_K)


@register
class IQ2_XS(_EvenSignLattice):
    """2.3125 bits per weight, needs an importance matrix: per super-block an fp16 d; per sub-block of 16
    two 16-bit words (a 9-bit grid index and 7 sign bits each) and a 4-bit scale s (d * (0.5 + s) / 4)."""

    name = "IQ2_XS"
    type_size = 74
    file_type = "MOSTLY_IQ2_XS"
    fallback = "IQ4_NL"
    requires_importance = True
    sub, group, kmax, nwant, steps, step_size = 16, 8, 3, 2, 9, 0.1
    empty_below, sigma2_factor, redo, fudge = 1e-15, 1, "off", 1.0

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        index, signs, scale, _ = self._fit(blocks, importance)
        d, codes, live = self._super_scales(scale.reshape(n, 16))
        quants = _le_bytes((index | (signs << 9)).reshape(n, 32), 2)
        quants = torch.where(live, quants, torch.zeros_like(quants))
        return torch.cat([d, quants, _nibble_pairs(codes)], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        words = _from_le(blocks[:, 2:66], 2)                                                   # (n, 32)
        sub_scale = d * (0.5 + _nibbles(blocks[:, 66:74])) * 0.25                              # (n, 16)
        magnitudes = grid_values(self.name).to(blocks.device)[words & 511]                     # (n, 32, 8)
        signed = torch.where(parity_signs(words >> 9), -magnitudes, magnitudes)
        return (sub_scale.repeat_interleave(2, dim=-1).unsqueeze(-1) * signed).reshape(n, QK_K)


@register
class IQ2_S(_Lattice):
    """2.5625 bits per weight: per super-block an fp16 d; per sub-block of 16 two 10-bit grid indices (low
    bytes in qs, two high bits each in qh), 16 sign bits and a 4-bit scale s (d * (0.5 + s) / 4). Layout:
    d (2 bytes), qs (32), signs (32), qh (8), scales (8)."""

    name = "IQ2_S"
    type_size = 82
    file_type = "MOSTLY_IQ2_S"
    fallback = "IQ4_NL"
    sub, group, kmax, nwant, steps, step_size = 16, 8, 3, 1, 9, 0.1
    empty_below, sigma2_factor, redo, fudge = 1e-8, 2, "off", 0.9875

    flat_weights = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        index, signs, scale, _ = self._fit(blocks, importance)
        signs = torch.where(scale < 0, ~signs & 255, signs)
        d, codes, live = self._super_scales(scale.abs().reshape(n, 16))
        index = index.reshape(n, 32)
        high = _words((index >> 8).reshape(n, 8, 4), (0, 2, 4, 6)).to(torch.uint8)
        codes = torch.where(live, codes, torch.zeros_like(codes))
        return torch.cat([d, (index & 0xFF).to(torch.uint8), signs.reshape(n, 32).to(torch.uint8), high,
                          _nibble_pairs(codes)], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        high = (blocks[:, 66:74].unsqueeze(-1).long() >> torch.tensor([0, 2, 4, 6], device=blocks.device)) & 3
        index = blocks[:, 2:34].long() | (high.reshape(n, 32) << 8)
        sub_scale = d * (0.5 + _nibbles(blocks[:, 74:82])) * 0.25                              # (n, 16)
        magnitudes = grid_values(self.name).to(blocks.device)[index]                           # (n, 32, 8)
        negative = unpack_bits(blocks[:, 34:66]).reshape(n, 32, 8).bool()
        signed = torch.where(negative, -magnitudes, magnitudes)
        return (sub_scale.repeat_interleave(2, dim=-1).unsqueeze(-1) * signed).reshape(n, QK_K)
