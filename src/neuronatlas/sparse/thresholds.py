"""Per-token thresholds on projection inputs at inference (TEAL, WINA): masks and their kernels.

An input channel i is kept on a token when its score (``|x_i|``, or WINA's ``|x_i| * ||W[:, i]||``)
is above the projection's threshold. Projections that read one input form an :class:`InputGroup`
(q, k, v; gate and up; down alone; o alone). On a decode step (at most ``MAX_BAG_TOKENS`` tokens,
one per sequence) the group computes all its outputs at its first call and hands the others out
at theirs: when every member keeps the same channels (TEAL) from one table ``[W_1ᵀ | W_2ᵀ ...]``
(in, sum of outs) whose kept rows are read in place, else one such call per member: in float32
on a CPU by one compiled call (:mod:`.row_kernel`), otherwise by :func:`.kernels.weighted_row_sums`.
With B sequences the rows read are the sum of each token's kept rows; when that exceeds the
dense weight's rows (batch 4 at 50%: twice as many) the group falls back to the dense product of
the masked input, which reads every row once (counted in ``Phase.kernel_calls``). From the batch
size at which the calibrated sparsity expects three times the rows (``DENSE_AT``) it goes there
without counting; below it the kept channels are counted. Calls of more tokens (prefill) always
take that masked dense product. It uses each projection's own (out, in) weight, as the dense model
does (``x @ Wᵀ`` from the (in, out) table was 10-15% slower at 16 tokens), and TEAL's masked input
is one ``hardshrink`` (|x_i| > threshold kept), made once for the members that share it.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from . import row_kernel
from .ffn import tokens_of
from .kernels import weighted_row_sums

MAX_BAG_TOKENS = 16  # calls of more tokens (prefill) use the masked dense product
DENSE_AT = 3.0  # tokens expected to keep this many times the weight's rows: the dense product, without counting


def threshold_at(quantiles: torch.Tensor, sparsity: float) -> float:
    """The score below which a share ``sparsity`` of the calibration inputs fall."""
    if sparsity <= 0:
        return float("-inf")
    position = min(float(sparsity), 1.0) * (quantiles.numel() - 1)
    low = int(position)
    high = min(low + 1, quantiles.numel() - 1)
    fraction = position - low
    return float(quantiles[low] * (1 - fraction) + quantiles[high] * fraction)


class SparseInputProjection:
    """One projection whose input channels are dropped per token when their score is below a threshold."""

    def __init__(self, weight: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 scale: torch.Tensor | None, random_sparsity: float | None, sparsity: float):
        self.weight = weight  # (out, in): the model's own, for the masked dense product
        self.weight_t = weight_t  # (in, out): row i = input channel i (a column slice of a group table)
        self.bias = bias
        self.threshold = threshold
        self.sparsity = sparsity  # the share of channels the threshold drops on the calibration inputs
        self.scale = scale  # (in,) WINA's column norms, None for TEAL
        self.random_sparsity = random_sparsity  # the random control drops this share of channels

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_sparsity is not None:
            return torch.rand_like(x, dtype=torch.float32) >= self.random_sparsity
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return score > self.threshold

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) with the dropped channels zeroed: the input of the masked dense product."""
        if self.random_sparsity is None and self.scale is None:
            return F.hardshrink(x, self.threshold)  # TEAL: |x_i| > threshold kept, one op instead of four
        return x * self.mask(x)

    def forward(self, x: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Many tokens: the dense product of the masked input, x (..., in) -> (..., out); ``masked``:
        that input when the caller has it already."""
        masked = self.masked(x) if masked is None else masked
        return F.linear(masked.to(self.weight.dtype), self.weight, self.bias)

    def kept_rows_product(self, flat: torch.Tensor, table: torch.Tensor,
                          counts: Counter) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(flat * mask) @ table`` (B, out) reading only the kept rows of ``table`` (in, out), without
        bias, or None when the tokens keep more rows together than the table has (then a dense product
        reads fewer bytes); and the masked input (B, in), for that dense product (None where the
        compiled kernel thresholds one token alone). Counts the call as "rows" or "dense"."""
        kernel = self.random_sparsity is None and row_kernel.supports(table)  # one compiled call (float32 CPU)
        # several tokens are checked against the rows before the kernel's call, whose fixed cost
        # (~60 µs) was 5% of a 16-sequence decode step
        masked = self.masked(flat) if len(flat) > 1 or not kernel else None
        if masked is not None and int(torch.count_nonzero(masked)) > flat.shape[1]:
            out = None
        elif kernel:
            out = row_kernel.thresholded_rows(flat, self.threshold, self.scale, table, flat.shape[1])
        else:
            kept = [row.nonzero().squeeze(1) for row in masked]  # a kept channel that is exactly 0 adds nothing
            out = weighted_row_sums(table, kept, [row[k] for row, k in zip(masked, kept)])
        counts["dense" if out is None else "rows"] += 1
        return out, masked

    def with_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias


class InputGroup:
    """Projections reading one input; on decode steps all are computed at the first member's call."""

    def __init__(self, members: dict[str, SparseInputProjection], table: torch.Tensor | None, counts: Counter):
        self.members = members  # role -> projection, in table column order
        self.table = table  # (in, sum of outs) when the members share their mask, else None
        self.widths = [member.weight_t.shape[1] for member in members.values()]
        self.counts = counts  # "rows" / "dense" decode calls, shared by the model's runtimes
        self.x: torch.Tensor | None = None  # the input whose other outputs are waiting
        self.waiting: dict[str, torch.Tensor] = {}
        self.masked_of: torch.Tensor | None = None  # the input whose shared masked copy is kept
        self.masked_input: torch.Tensor | None = None
        self.masked_waiting: set[str] = set()  # the members yet to use it: the last one lets it go
        # tokens from which every member is expected, at its calibrated sparsity, to keep at least DENSE_AT
        # times its weight's rows (batch 6 at 50%): the dense product reads fewer bytes, and counting the
        # kept channels first (~50 µs a call at batch 16) would cost more than it could tell. Below it the
        # count decides: at 2x expected (batch 4 at 50%) a quarter of SmolLM2's calls kept fewer channels
        # than rows on held-out text, and the row kernel made batch 4 1.05x instead of 0.96x
        self.dense_from = max(2, max(math.ceil(DENSE_AT / (1 - m.sparsity)) if m.sparsity < 1 else math.inf
                                     for m in members.values()))

    @property
    def shared_mask(self) -> bool:
        return self.table is not None

    def row_tables(self) -> list[torch.Tensor]:
        """The (in, out) tables the decode kernels read rows of: the shared one, or each member's."""
        return [self.table] if self.shared_mask else [member.weight_t for member in self.members.values()]

    def use_row_tables(self, tables: list[torch.Tensor]) -> None:
        """Read rows from ``tables`` (copies of :meth:`row_tables`, e.g. in huge pages) from now on."""
        if self.shared_mask:
            self.table = tables[0]
            tables = column_slices(self.table, self.widths)
        for member, table in zip(self.members.values(), tables):
            member.weight_t = table

    def forward(self, role: str, x: torch.Tensor) -> torch.Tensor:
        if x is self.x and role in self.waiting:
            out = self.waiting.pop(role)
            if not self.waiting:
                self.x = None
            return out
        tokens = tokens_of(x)
        if tokens > MAX_BAG_TOKENS or tokens >= self.dense_from:
            return self._masked_dense(role, x, decode=tokens <= MAX_BAG_TOKENS)
        outputs = self._decode(x.reshape(-1, x.shape[-1]))  # role -> (B, out)
        outputs = {name: out.view(*x.shape[:-1], -1) for name, out in outputs.items()}
        self.x, self.waiting = x, {name: out for name, out in outputs.items() if name != role}
        return outputs[role]

    def _masked_dense(self, role: str, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """The dense product of the masked input; members that share their mask share one masked copy
        (q, then k and v; gate, then up). A decode step counts as "dense" once per masked input."""
        member = self.members[role]
        if x is self.masked_of and role in self.masked_waiting:
            masked = self.masked_input
            self.masked_waiting.discard(role)
            if not self.masked_waiting:  # a prefill's masked input is (B, T, in): not kept past its use
                self.masked_of = self.masked_input = None
            return member.forward(x, masked)
        masked = member.masked(x)
        if self.shared_mask and len(self.members) > 1:
            self.masked_of, self.masked_input, self.masked_waiting = x, masked, set(self.members) - {role}
        if decode:
            self.counts["dense"] += 1
        return member.forward(x, masked)

    def _decode(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every member's output for the tokens flat (B, in)."""
        if self.shared_mask:
            first = next(iter(self.members.values()))
            out, masked = first.kept_rows_product(flat, self.table, self.counts)  # (B, sum of outs)
            if out is None:  # the members share the masked input
                return {role: member.forward(flat, masked) for role, member in self.members.items()}
            parts = out.split(self.widths, dim=1)
            return {role: member.with_bias(part) for (role, member), part in zip(self.members.items(), parts)}
        outputs = {}
        for role, member in self.members.items():
            out, masked = member.kept_rows_product(flat, member.weight_t, self.counts)
            outputs[role] = member.forward(flat, masked) if out is None else member.with_bias(out)
        return outputs


class ThresholdRuntime:
    """One layer: each sparsified role's group; other roles run their original module, and so do all
    roles during a prompt's prefill when ``dense_prefill_phase`` (the model's Phase) is given."""

    def __init__(self, groups: dict[str, InputGroup], roles: dict, dense_prefill_phase=None):
        self.groups = groups  # role -> its group
        self.roles = roles  # role -> module to swap (FFN and attention projections this runtime computes)
        self.phase = dense_prefill_phase  # the Phase of the model's calls when prompts run dense, else None

    def forward(self, role, x, original):
        group = self.groups.get(role)
        if group is None or (self.phase is not None and self.phase.prefill):
            return original(x)
        return group.forward(role, x)


def build_group(weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]], thresholds: dict[str, float],
                scales: dict[str, torch.Tensor | None], random: dict[str, float | None], sparsities: dict[str, float],
                counts: Counter) -> InputGroup:
    """An :class:`InputGroup` of ``weights`` (role -> ((out, in) weight, bias)) reading one input;
    ``sparsities``: the share of channels each threshold drops (calibration), for the kernel choice."""
    roles = list(weights)
    shared = all(scales[r] is None and random[r] is None and thresholds[r] == thresholds[roles[0]] for r in roles)
    if shared:  # one table; the members' weights are column slices of it (no second copy)
        table = torch.cat([weights[r][0] for r in roles]).T.contiguous()
        slices = dict(zip(roles, column_slices(table, [weights[r][0].shape[0] for r in roles])))
    else:
        table, slices = None, {r: weights[r][0].T.contiguous() for r in roles}
    members = {r: SparseInputProjection(weights[r][0], slices[r], weights[r][1], thresholds[r], scales[r], random[r],
                                        sparsities[r]) for r in roles}
    return InputGroup(members, table, counts)


def column_slices(table: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Views of ``table`` (in, sum of widths): consecutive column blocks of ``widths``."""
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    return [table[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
