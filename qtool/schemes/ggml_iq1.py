"""GGML's 1-bit i-quants, IQ1_S (1.5625 bits per weight) and IQ1_M (1.75): groups of 8 ternary levels
(-1, 0, 1) that must form a point of a 2048-point grid, every level shifted by the same +-1/8 (the
"delta", one sign per sub-block in IQ1_S, per group of 8 in IQ1_M), under 3-bit sub-block scales.

With three levels, llama.cpp's search (quantize_row_iq1_{s,m}_impl) is exhaustive: the best weighted
fit of a sub-block splits its values, sorted, at two boundaries, so every split i1 <= i2 is scored for
each delta sign from prefix sums of w * x and w; the winner is snapped to the grid (an off-grid group
takes the neighbour of least weighted error from the same neighbour lists as the other lattice types,
:func:`qtool.schemes.ggml_iquants.lattice`) and its scale refit. The sums, comparisons and ties run in
its order (a stable sort, left-to-right float32 sums, the first of equal candidates), so the bytes equal
libggml's (tests/test_ggml.py). On the CPU the C kernel (cpu_ggml.c's quantize_iq1) gives them.
"""
from __future__ import annotations

import functools
from typing import ClassVar

import torch

from qtool.schemes.base import register
from qtool.schemes.ggml import QK_K, GGMLType, divide, fp16_bytes, fp16_from_bytes, nearest_int
from qtool.schemes.ggml_iquants import (_from_le, _le_bytes, exact_sqrt, grid_values, group_codes, lattice,
                                        lattice_int32, sequential_sum)

DELTA = 0.125
PLUS = (-1 + DELTA, DELTA, 1 + DELTA)        # levels 0, 1, 2 with the delta added (llama.cpp's x_p)
MINUS = (-1 - DELTA, -DELTA, 1 - DELTA)      # ... subtracted (x_m)
FLT_MAX = 3.4028234663852886e38


@functools.cache
def _splits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every split 0 <= i1 <= i2 <= n of n sorted values, i1 outer: (i1, i2) int64."""
    pairs = [(i1, i2) for i1 in range(n + 1) for i2 in range(i1, n + 1)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _prefix(values: torch.Tensor, include: torch.Tensor | None = None) -> torch.Tensor:
    """Running sums from 0, left to right in float32 (torch's cumsum adds in double): (r, n) -> (r, n + 1).
    ``include``: where False the sum is carried over unchanged (no + 0.0)."""
    sums = [torch.zeros_like(values[:, :1])]
    for j in range(values.shape[1]):
        step = sums[-1] + values[:, j:j + 1]
        sums.append(step if include is None else torch.where(include[:, j:j + 1], step, sums[-1]))
    return torch.cat(sums, dim=1)


def _levels(levels: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """Ternary levels 0..2 -> their values, PLUS or MINUS where ``minus`` (broadcast) says so."""
    plus = torch.tensor(PLUS, device=levels.device)[levels]
    return torch.where(minus, torch.tensor(MINUS, device=levels.device)[levels], plus)


class _Ternary(GGMLType):
    """IQ1_S and IQ1_M: the split search per sub-block of ``sub``, then the grid snap and refit."""

    block_size = QK_K
    takes_importance = True
    fallback = "IQ4_NL"
    sub: ClassVar[int]               # elements per sub-block scale
    empty_below: ClassVar[float]     # a sub-block whose largest magnitude is below this stays zero
    medium: ClassVar[bool]           # IQ1_M: one delta sign per group of 8 (four combinations per split)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lattice("IQ1_S", 3, 3)       # IQ1_M uses IQ1_S's grid

    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """(n, 256): importance * sqrt(2 mean(x^2) + x^2), or x^2 without an importance matrix (IQ1_M)."""
        if importance is None:
            return x * x
        sigma2 = 2 * sequential_sum(x * x) / QK_K
        return importance * exact_sqrt(sigma2 + x * x)

    def _candidates(self, xs: torch.Tensor, ws: torch.Tensor, order: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum w q x, sum w q^2) of every candidate (rows, C), in llama.cpp's order, for sub-blocks sorted
        ascending (xs, ws; ``order``: each sorted place's original index)."""
        raise NotImplementedError

    def _signs(self, choice: torch.Tensor) -> torch.Tensor:
        """Candidate index (rows,) -> the delta sign of each group of 8 (rows, sub / 8): True = MINUS."""
        raise NotImplementedError

    def _fit(self, blocks: torch.Tensor, importance: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grid index of each group (n * subs, sub / 8), MINUS per group, scale (n * subs, 1), element
        weights (n, 256)), llama.cpp's search; empty sub-blocks get index 0, PLUS and scale 0."""
        levels_table, grid_map, neighbours = (t.to(blocks.device) for t in self.tables())
        x = blocks.to(torch.float32)
        weight = self._weights(x, importance)
        rows, sub, groups = x.shape[0] * (QK_K // self.sub), self.sub, self.sub // 8
        xb, wb = x.reshape(rows, sub), weight.reshape(rows, sub)
        peak = xb.abs().amax(dim=-1)
        empty = peak < torch.tensor(self.empty_below, dtype=torch.float32)
        order = torch.sort(xb, dim=-1, stable=True).indices
        qx, q2 = self._candidates(xb.gather(1, order), wb.gather(1, order), order)
        # The candidates in order, the first best kept: a later one replaces it only if qx^2 > best q2.
        best = torch.full((rows,), -FLT_MAX, device=x.device)
        scale = torch.zeros_like(best)
        choice = torch.full((rows,), -1, dtype=torch.long, device=x.device)
        qx_t, q2_t = qx.t().contiguous(), q2.t().contiguous()
        for c in range(qx_t.shape[0]):
            sx, s2 = qx_t[c], q2_t[c]
            take = (s2 > 0) & (sx * sx > best * s2)
            trial = sx / torch.where(take, s2, torch.ones_like(s2))
            scale = torch.where(take, trial, scale)
            best = torch.where(take, trial * sx, best)
            choice = torch.where(take, c, choice)
        empty = empty | (choice < 0)
        pairs = choice.clamp(min=0) // (4 if self.medium else 2)
        first, second = (part.to(x.device)[pairs].unsqueeze(-1) for part in _splits(sub))
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(sub, device=x.device).expand(rows, -1))
        levels = (rank >= first).long() + (rank >= second).long()
        minus = self._signs(choice.clamp(min=0))
        negative = (scale < 0).unsqueeze(-1)
        levels = torch.where(negative, 2 - levels, levels)
        minus = minus ^ negative
        scale = scale.abs()
        # Groups of 8 onto the grid; an off-grid one takes its neighbour of least sum w (s q - x)^2.
        group_levels = levels.reshape(rows, groups, 8)
        index = grid_map[group_codes(group_levels)]
        off = (index < 0) & ~empty.unsqueeze(-1)
        if bool(off.any()):
            at_row, at_group = off.nonzero(as_tuple=True)
            codes = group_codes(group_levels[at_row, at_group])
            candidates = neighbours[codes]                                                # (k, M)
            values = _levels(levels_table[candidates.clamp(min=0)], minus[at_row, at_group].reshape(-1, 1, 1))
            diff = scale[at_row].reshape(-1, 1, 1) * values - xb.reshape(rows, groups, 8)[at_row, at_group].unsqueeze(1)
            d2 = sequential_sum(wb.reshape(rows, groups, 8)[at_row, at_group].unsqueeze(1) * diff * diff).squeeze(-1)
            d2 = torch.where((candidates >= 0) & (d2 < FLT_MAX), d2, torch.full_like(d2, float("inf")))
            index = index.clone()
            index[at_row, at_group] = candidates.gather(-1, d2.argmin(dim=-1, keepdim=True)).squeeze(-1)
            # Refit the scale of a sub-block with an off-grid group, if the fit is positive.
            q = _levels(levels_table[index.clamp(min=0)], minus.unsqueeze(-1)).reshape(rows, sub)
            sum_qx = sequential_sum(wb * q * xb).squeeze(-1)
            sum_q2 = sequential_sum(wb * q * q).squeeze(-1)
            refit = off.any(-1) & (sum_qx > 0) & (sum_q2 > 0)
            scale = torch.where(refit, sum_qx / torch.where(refit, sum_q2, torch.ones_like(sum_q2)), scale)
        keep = ~empty.unsqueeze(-1)
        return (torch.where(keep, index, torch.zeros_like(index)), minus & keep,
                torch.where(empty, torch.zeros_like(scale), scale).unsqueeze(-1), weight)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        if blocks.device.type == "cpu":
            from qtool.kernels.cpu import ternary_quantize     # the same bytes in C, None without a compiler

            fast = ternary_quantize(blocks, importance, self.type_size, int(self.medium), lattice_int32("IQ1_S", 3, 3))
            if fast is not None:
                return fast
        return self._pack(blocks, *self._fit(blocks, importance))

    def _pack(self, blocks: torch.Tensor, index: torch.Tensor, minus: torch.Tensor, scale: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
        """The block bytes of :meth:`_fit`'s choices (and its element weights, for IQ1_M's refit of d)."""
        raise NotImplementedError

    def _scale_codes(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, subs) sub-block scales -> (d = max / 15, 3-bit codes round((s / d - 1) / 2), live (n, 1))."""
        max_scale = scales.amax(dim=-1, keepdim=True)
        live = max_scale > 0
        d = divide(max_scale, 15)
        inverse = 1 / torch.where(live, d, torch.ones_like(d))
        codes = nearest_int(0.5 * (inverse * scales - 1)).clamp(0, 7).to(torch.int64)
        return d, torch.where(live, codes, torch.zeros_like(codes)), live


@register
class IQ1_S(_Ternary):
    """1.5625 bits per weight, needs an importance matrix: per super-block an fp16 d; per sub-block of 32
    four 11-bit grid indices (low bytes in qs), a 3-bit scale s (d * (2s + 1)) and the delta's sign in a
    16-bit word (the indices' high bits at 3k, s at 12, minus at 15). Layout: d (2 bytes), qs (32),
    words (16)."""

    name = "IQ1_S"
    type_size = 50
    file_type = "MOSTLY_IQ1_S"
    fp16_offsets = (0,)
    requires_importance = True
    sub, empty_below, medium = 32, 1e-12, False

    def _candidates(self, xs: torch.Tensor, ws: torch.Tensor, order: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = _splits(self.sub)
        def thirds(sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """Sums below i1, from i1 to i2 and from i2 on, per split."""
            return sums[:, first] - sums[:, :1], sums[:, second] - sums[:, first], sums[:, -1:] - sums[:, second]

        (low_x, mid_x, high_x), (low_w, mid_w, high_w) = thirds(_prefix(ws * xs)), thirds(_prefix(ws))
        qx, q2 = [], []
        for p0, p1, p2 in (PLUS, MINUS):
            qx.append((low_x * p0 + mid_x * p1) + high_x * p2)
            q2.append((low_w * p0 * p0 + mid_w * p1 * p1) + high_w * p2 * p2)
        # Per split: PLUS, then MINUS.
        return torch.stack(qx, -1).flatten(1), torch.stack(q2, -1).flatten(1)

    def _signs(self, choice: torch.Tensor) -> torch.Tensor:
        return (choice % 2 == 1).unsqueeze(-1).expand(-1, self.sub // 8)

    def _pack(self, blocks: torch.Tensor, index: torch.Tensor, minus: torch.Tensor, scale: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, codes, live = self._scale_codes(scale.reshape(n, 8))
        stored = torch.where(live, d * torch.tensor(1.125, dtype=torch.float32), torch.zeros_like(d))
        high = ((index >> 8) << torch.tensor([0, 3, 6, 9], device=index.device)).sum(-1).reshape(n, 8)
        words = high | torch.where(live, (codes << 12) | (minus[:, 0].reshape(n, 8).long() << 15), 0)
        return torch.cat([fp16_bytes(stored), (index & 0xFF).to(torch.uint8).reshape(n, 32), _le_bytes(words, 2)], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        words = _from_le(blocks[:, 34:50], 2)                                                   # (n, 8)
        sub_scale = (d * (2 * ((words >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
        delta = torch.where((words & 0x8000) != 0, -DELTA, DELTA).to(torch.float32).reshape(n, 8, 1, 1)
        high = (words.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7
        index = blocks[:, 2:34].long().reshape(n, 8, 4) | (high << 8)
        grid = grid_values(self.name).to(blocks.device)[index]                                 # (n, 8, 4, 8)
        return (sub_scale * (grid + delta)).reshape(n, QK_K)


# IQ1_M's qh bits for a sub-block's delta signs, by combination (group 0, group 1): ++, +-, -+, --.
_MEDIUM_MASKS = (0x00, 0x80, 0x08, 0x88)


@register
class IQ1_M(_Ternary):
    """1.75 bits per weight: per sub-block of 16 two 11-bit grid indices (low bytes in qs, high bits and
    the delta sign of each group of 8 in a qh byte) and a 3-bit scale s (d * (2s + 1)); the super-block's
    fp16 d lies in the top nibbles of the four 16-bit scale words. d is refit over the whole super-block
    after the codes are chosen. Layout: qs (32 bytes), qh (16), scales (8)."""

    name = "IQ1_M"
    type_size = 56
    file_type = "MOSTLY_IQ1_M"
    sub, empty_below, medium = 16, 1e-7, True

    def _candidates(self, xs: torch.Tensor, ws: torch.Tensor, order: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = _splits(self.sub)
        in_low = order < self.sub // 2            # the sorted place's element lies in group 0
        halves = []
        for include in (in_low, ~in_low):
            sum_x, sum_w = _prefix(ws * xs, include), _prefix(ws, include)
            total_x, total_w = sum_x[:, -1:], sum_w[:, -1:]
            both = sum_x[:, first] + sum_x[:, second]
            w1, w2 = sum_w[:, first], sum_w[:, second]
            signs = {}
            for name, (v0, v1, v2) in (("+", PLUS), ("-", MINUS)):
                c1, c2 = v0 * v0 - v1 * v1, v1 * v1 - v2 * v2       # exact in float32
                signs[name] = (total_x * v2 - both, (total_w * v2 * v2 + w1 * c1) + w2 * c2)
            halves.append(signs)
        qx, q2 = [], []
        for low, high in (("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")):
            qx.append(halves[0][low][0] + halves[1][high][0])
            q2.append(halves[0][low][1] + halves[1][high][1])
        return torch.stack(qx, -1).flatten(1), torch.stack(q2, -1).flatten(1)

    def _signs(self, choice: torch.Tensor) -> torch.Tensor:
        combination = choice % 4
        return torch.stack([combination >= 2, combination % 2 == 1], -1)

    def _pack(self, blocks: torch.Tensor, index: torch.Tensor, minus: torch.Tensor, scale: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, codes, live = self._scale_codes(scale.reshape(n, 16))
        # d refit over the super-block with the chosen codes (empty sub-blocks count as grid point 0).
        levels_table = self.tables()[0].to(blocks.device)
        values = _levels(levels_table[index], minus.unsqueeze(-1)).reshape(n, 16, 16)
        q = (values * (2 * codes + 1).to(torch.float32).unsqueeze(-1)).reshape(n, QK_K)
        x = blocks.to(torch.float32)
        sum_qx, sum_q2 = sequential_sum(weight * q * x), sequential_sum(weight * q * q)
        d = torch.where(sum_q2 > 0, sum_qx / torch.where(sum_q2 > 0, sum_q2, torch.ones_like(sum_q2)), d)
        half = fp16_bytes(d * torch.tensor(1.1125, dtype=torch.float32))
        half_bits = half[:, 0].long() | (half[:, 1].long() << 8)
        nibbles = (half_bits.unsqueeze(-1) >> torch.tensor([0, 4, 8, 12], device=blocks.device)) & 0xF
        words = (codes.reshape(n, 4, 4) << torch.tensor([0, 3, 6, 9], device=blocks.device)).sum(-1) | (nibbles << 12)
        words = torch.where(live, words, torch.zeros_like(words))
        index = index.reshape(n, 16, 2)
        combination = (minus.long() * torch.tensor([2, 1], device=blocks.device)).sum(-1)
        masks = torch.tensor(_MEDIUM_MASKS, device=blocks.device)[combination]
        qh = (index[..., 0] >> 8) | ((index[..., 1] >> 8) << 4) | torch.where(live, masks.reshape(n, 16), 0)
        return torch.cat([(index & 0xFF).to(torch.uint8).reshape(n, 32), qh.to(torch.uint8), _le_bytes(words, 2)], -1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        words = _from_le(blocks[:, 48:56], 2)                                                   # (n, 4)
        nibbles = (words >> 12) << torch.tensor([0, 4, 8, 12], device=blocks.device)
        half = nibbles.sum(-1, keepdim=True)
        d = fp16_from_bytes(torch.cat([half & 0xFF, half >> 8], -1).to(torch.uint8))
        codes = ((words.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7).reshape(n, 16)
        sub_scale = (d * (2 * codes + 1).to(torch.float32)).reshape(n, 16, 1, 1)
        qh = blocks[:, 32:48].long().unsqueeze(-1) >> torch.tensor([0, 4], device=blocks.device)   # (n, 16, 2)
        delta = torch.where((qh & 0x08) != 0, -DELTA, DELTA).to(torch.float32).unsqueeze(-1)
        index = blocks[:, :32].long().reshape(n, 16, 2) | ((qh & 7) << 8)
        grid = grid_values("IQ1_S").to(blocks.device)[index]                                   # (n, 16, 2, 8)
        return (sub_scale * (grid + delta)).reshape(n, QK_K)

