"""The vocabulary shards and the one collective of vocabulary-parallel BS-T (steps 1-3 of vocab_parallel.py).

:class:`VocabShards` says which vocabulary range every rank holds (gathered from each rank's start and size, or
derived from a DTensor's placement); :class:`ShardedRows` runs a shard's local pass, packs its per-row statistics
into one all_gather, merges them into the global statistics the epilogue needs, and maps the global gradient
coefficients back to the shard for the communication-free backward. The algorithm, its tie rule and its
communication volume are stated in vocab_parallel.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from ._dtypes import compute_dtype
from ._options import BSOptions
from .backends import get_backend, resolve_impl
from .backends.contract import RawRowStats
from .epilogue import backward_rows, finish_rows

# The one all_gather every call goes through (tests and the benchmark wrap it to count bytes): all_gather_single
# replaces all_gather_into_tensor in recent torch; both take (output, input, group).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class VocabShards:
    """Which vocabulary range every rank of ``group`` holds: rank p has ids [starts[p], starts[p] + sizes[p])."""

    starts: tuple[int, ...]  # indexed by the rank within the group
    sizes: tuple[int, ...]
    rank: int  # this process's rank within the group
    group: object  # a torch.distributed ProcessGroup, or None for the default group

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def world(self) -> int:
        return len(self.sizes)

    def candidate_count(self, belief_count: int, rank: int) -> int:
        """k_p = min(k, V_p): how many top-k candidates rank p contributes."""
        return min(belief_count, self.sizes[rank])

    def padded_candidates(self, belief_count: int) -> int:
        """k_pad = max_p k_p: the per-rank width of the gathered candidates."""
        return max(self.candidate_count(belief_count, rank) for rank in range(self.world))

    @classmethod
    def even_chunks(cls, vocab_size: int, world: int, rank: int, group) -> VocabShards:
        """The torch.chunk split DTensor's Shard uses: ceil(V / P) ids per rank, the last ranks shorter or empty."""
        chunk = -(-vocab_size // world)
        starts = tuple(min(p * chunk, vocab_size) for p in range(world))
        sizes = tuple(max(0, min(chunk, vocab_size - p * chunk)) for p in range(world))
        return cls(starts, sizes, rank, group)

    @classmethod
    def gathered(cls, local_size: int, vocab_start: object, group, device: torch.device) -> VocabShards:
        """Each rank's (start, size) by one all_gather of two int64, checked to tile [0, V) without gaps."""
        if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
            raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
        world = dist.get_world_size(group)
        mine = torch.tensor([vocab_start, local_size], dtype=torch.int64, device=device)
        everyone = torch.empty(world * 2, dtype=torch.int64, device=device)
        all_gather_single(everyone, mine, group=group)
        pairs = everyone.view(world, 2).tolist()
        starts, sizes = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        expected_start = 0
        for start, size in sorted(zip(starts, sizes)):
            if start != expected_start:
                raise ValueError(
                    f"vocab_start: the shards (start, size) per rank {list(zip(starts, sizes))} do not tile the "
                    f"vocabulary contiguously from 0 (a shard should start at {expected_start}, not {start})"
                )
            expected_start = start + size
        if expected_start == 0:
            raise ValueError("the vocabulary shards are all empty: the logits' last dimension is 0 on every rank")
        return cls(starts, sizes, dist.get_rank(group), group)


def shard_labels(rows_labels: torch.Tensor, shards: VocabShards) -> torch.Tensor:
    """Global row labels [N] (-1 = ignored) -> this shard's numbering; -1 where the label lives on another rank."""
    in_shard = (rows_labels >= shards.start) & (rows_labels < shards.start + shards.size)
    return torch.where(in_shard, rows_labels - shards.start, torch.full_like(rows_labels, -1))


def _carrier_dtype(stats_dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the statistics' width: float values travel bit-cast beside the int ids in one tensor."""
    return torch.int64 if stats_dtype == torch.float64 else torch.int32


class ShardedRows:
    """Steps 1-3 on one block of rows: the global RowOutputs and, for backward, the shard's candidate ids/weights."""

    def __init__(self, backend: ModuleType | None, options: BSOptions, shards: VocabShards) -> None:
        self.backend = backend  # None on a rank whose shard is empty
        self.options = options
        self.shards = shards
        self.belief_count = options.belief_count(shards.vocab_size)
        self.padded = shards.padded_candidates(self.belief_count)
        self.local_count = shards.candidate_count(self.belief_count, shards.rank)

    def local_pass(self, logits: torch.Tensor, local_labels: torch.Tensor, stats_dtype: torch.dtype) -> RawRowStats:
        """Step 1: the shard's lse, label logit and top-k_p, in the shard's id numbering."""
        num_rows = logits.shape[0]
        if self.shards.size == 0:
            empty = torch.full((num_rows,), float("-inf"), dtype=stats_dtype, device=logits.device)
            no_candidates = torch.empty(num_rows, 0, dtype=stats_dtype, device=logits.device)
            return RawRowStats(empty, empty.clone(), no_candidates, no_candidates.to(torch.int64))
        return self.backend.forward(logits, local_labels, self.local_count)

    def gather(self, raw: RawRowStats, local_labels: torch.Tensor, stats_dtype: torch.dtype):
        """Step 2's one all_gather: [P, N] lse and masked label logits, [P, N, k_pad] candidate values and ids."""
        num_rows, device = local_labels.shape[0], local_labels.device
        carrier = _carrier_dtype(stats_dtype)
        padding = self.padded - self.local_count
        values = raw.belief_logits.to(stats_dtype)
        ids = raw.belief_ids.to(torch.int64) + self.shards.start
        if padding:
            values = torch.cat([values, values.new_full((num_rows, padding), float("-inf"))], dim=1)
            ids = torch.cat([ids, ids.new_full((num_rows, padding), -1)], dim=1)
        # Only the owner's label logit counts; the others send 0, so a sum over ranks picks the owner's value.
        label_logits = torch.where(local_labels >= 0, raw.label_logits.to(stats_dtype), 0.0)
        floats = torch.cat([raw.lse.to(stats_dtype).unsqueeze(1), label_logits.unsqueeze(1), values], dim=1)
        packed = torch.cat([floats.contiguous().view(carrier), ids.to(carrier)], dim=1)  # [N, 2 + 2 k_pad]
        everyone = torch.empty(self.shards.world * num_rows, packed.shape[1], dtype=carrier, device=device)
        all_gather_single(everyone, packed, group=self.shards.group)
        everyone = everyone.view(self.shards.world, num_rows, -1)
        floats = everyone[..., : 2 + self.padded].contiguous().view(stats_dtype)
        return floats[..., 0], floats[..., 1], floats[..., 2:], everyone[..., 2 + self.padded :].to(torch.int64)

    def merge(self, lse_all, label_logits_all, values_all, ids_all) -> tuple[RawRowStats, torch.Tensor]:
        """Step 2's combination: global RawRowStats and the chosen candidates' slots in the [P * k_pad] order."""
        world, num_rows, padded = values_all.shape
        lse = torch.logsumexp(lse_all, dim=0)
        label_logits = label_logits_all.sum(0)
        values = values_all.permute(1, 0, 2).reshape(num_rows, world * padded)
        ids = ids_all.permute(1, 0, 2).reshape(num_rows, world * padded)
        # Real candidates first in rank order, padding last, then a stable sort: ties go to the lower rank, and a
        # padding slot (value -inf, id -1) is never chosen over a real candidate of value -inf.
        counts = [self.shards.candidate_count(self.belief_count, rank) for rank in range(world)]
        slot_rank = torch.arange(world * padded, device=values.device) // max(padded, 1)
        slot_index = torch.arange(world * padded, device=values.device) % max(padded, 1)
        is_real = slot_index < torch.tensor(counts, device=values.device)[slot_rank]
        order = torch.cat([is_real.nonzero().squeeze(1), (~is_real).nonzero().squeeze(1)])
        _, position = torch.sort(values[:, order], dim=1, descending=True, stable=True)
        chosen_slots = order[position[:, : self.belief_count]]  # [N, k]
        merged = RawRowStats(
            lse=lse,
            label_logits=label_logits,
            belief_logits=values.gather(1, chosen_slots),
            belief_ids=ids.gather(1, chosen_slots),
        )
        return merged, chosen_slots

    def local_belief_weights(self, chosen_slots: torch.Tensor, belief_weights: torch.Tensor) -> torch.Tensor:
        """The gradient coefficients of this shard's own candidates [N, k_p]: the global belief weight where the
        candidate was chosen, 0 where it was not (step 4)."""
        num_rows = chosen_slots.shape[0]
        ours = (chosen_slots // max(self.padded, 1)) == self.shards.rank
        slots = torch.where(ours, chosen_slots % max(self.padded, 1), self.padded)  # others go to a dropped column
        weights = belief_weights.new_zeros(num_rows, self.padded + 1)
        weights.scatter_(1, slots, torch.where(ours, belief_weights, 0.0))
        return weights[:, : self.local_count].contiguous()

    def rows(self, logits: torch.Tensor, rows_labels: torch.Tensor, local_labels: torch.Tensor):
        """Steps 1-3: (global RowOutputs, the shard's candidate ids [N, k_p] int64, their weights [N, k_p])."""
        stats_dtype = compute_dtype(logits.dtype)
        raw = self.local_pass(logits, local_labels, stats_dtype)
        merged, chosen_slots = self.merge(*self.gather(raw, local_labels, stats_dtype))
        rows = finish_rows(merged, rows_labels, self.options)
        local_ids = raw.belief_ids.to(torch.int64).contiguous()
        return rows, local_ids, self.local_belief_weights(chosen_slots, rows.belief_weights)

    def grad_logits(
        self, grad_row_loss, logits, rows_labels, local_labels, lse, local_ids, local_weights, inplace: bool
    ):
        """Step 4: this shard's dL/dz = dL/dl * (-pi + label term if owned + its chosen beliefs' weights).

        dL/dl and lse go through epilogue.backward_rows, as on one process (0 on ignored rows, a NaN row where the
        row has no distribution); both are the same on every rank, so the shard needs nothing from the others.
        """
        if self.shards.size == 0:
            return torch.zeros_like(logits)
        grad_rows, lse = backward_rows(grad_row_loss, rows_labels, lse)
        return self.backend.backward(
            grad_rows, logits, local_labels, lse, local_ids, local_weights, self.options.label_weight, inplace
        )


def shard_backend(impl: str, device: torch.device, shards: VocabShards) -> ModuleType | None:
    name = resolve_impl(impl, device)
    if name == "reference":
        raise ValueError(
            'impl="reference" needs the whole vocabulary row; vocabulary-parallel logits need a kernel backend '
            '("auto", "torch", "native" or "triton"). To compare, gather the logits and call bs_token_loss.'
        )
    return get_backend(name, device) if shards.size > 0 else None
