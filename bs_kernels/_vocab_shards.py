"""The vocabulary shards and the collectives of vocabulary-parallel BS-T (steps 1-3 of vocab_parallel.py).

:class:`VocabShards` says which vocabulary range every rank holds, gathered in the call's first collective together
with the call record of _vocab_call.py that every rank must agree on; :class:`ShardedRows` runs a shard's local
pass, packs its per-row statistics into one all_gather, merges them into the global statistics the epilogue needs,
and maps the global gradient coefficients back to the shard for the communication-free backward. The algorithm, its
tie rule and its communication volume are stated in vocab_parallel.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from ._dtypes import compute_dtype
from ._options import BSOptions
from ._vocab_call import RECORD_LENGTH, CallRecord, disagreements, failed_record, failure_text, ready_record
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
    def agreed(cls, vocab_start: int, local_size: int, call: CallRecord, group, device: torch.device) -> VocabShards:
        """The layout from every rank's (start, size), after checking that every rank is ready and agrees.

        One all_gather of RECORD_LENGTH int64 (_vocab_call.py), the call's first collective. Raises the same
        ValueError on every rank when another rank failed a local check (its message), when the ranks disagree on
        the call (what differs, per rank), or when the shards do not tile [0, V).
        """
        everyone = _gather_records(ready_record(vocab_start, local_size, call, device), group)
        failed = [(rank, failure_text(record)) for rank, record in enumerate(everyone) if record[0] != 0]
        if failed:
            rank, text = failed[0]
            raise ValueError(
                f"vocabulary-parallel call: rank {rank} of the group rejected its arguments ({text}); "
                f"failed ranks: {[rank for rank, _ in failed]}. No rank computed anything."
            )
        differences = disagreements(everyone)
        if differences:
            raise ValueError(
                "vocabulary-parallel call: the ranks of the group disagree on " + "; ".join(differences) + ". Every "
                "rank must pass the same labels, batch and options, and logits (or hidden states and lm_head rows) "
                "of the same dtype."
            )
        starts, sizes = tuple(record[1] for record in everyone), tuple(record[2] for record in everyone)
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


def _gather_records(record: torch.Tensor, group) -> list[list[int]]:
    world = dist.get_world_size(group)
    everyone = torch.empty(world * RECORD_LENGTH, dtype=torch.int64, device=record.device)
    all_gather_single(everyone, record, group=group)
    return everyone.view(world, RECORD_LENGTH).tolist()


def announce_failure(error: BaseException, group, device: torch.device) -> None:
    """Send this rank's failure record in place of its ready one, so the other ranks raise instead of waiting for
    it in a collective; the caller then raises ``error`` itself."""
    _gather_records(failed_record(error, device), group)


def record_device(tensor: object, group) -> torch.device:
    """Where this rank's record travels: beside its tensor, or (no tensor to go by) where the group's backend
    communicates (CUDA for NCCL, else CPU)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_vocab_start(vocab_start: object) -> None:
    if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")


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
        """Step 1: the shard's max and log_sum, label logit and top-k_p, in the shard's id numbering."""
        num_rows = logits.shape[0]
        if self.shards.size == 0:
            empty = torch.full((num_rows,), float("-inf"), dtype=stats_dtype, device=logits.device)
            no_candidates = torch.empty(num_rows, 0, dtype=stats_dtype, device=logits.device)
            return RawRowStats(empty, empty.clone(), empty.clone(), no_candidates, no_candidates.to(torch.int64))
        return self.backend.forward(logits, local_labels, self.local_count)

    def gather(self, raw: RawRowStats, local_labels: torch.Tensor, stats_dtype: torch.dtype):
        """Step 2's one all_gather: [P, N] maxes, log_sums and masked label logits, [P, N, k_pad] candidate values
        and ids."""
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
        per_row = [raw.row_max.to(stats_dtype), raw.log_sum.to(stats_dtype), label_logits]
        floats = torch.cat([*(column.unsqueeze(1) for column in per_row), values], dim=1)
        packed = torch.cat([floats.contiguous().view(carrier), ids.to(carrier)], dim=1)  # [N, 3 + 2 k_pad]
        everyone = torch.empty(self.shards.world * num_rows, packed.shape[1], dtype=carrier, device=device)
        if num_rows > 0:  # an empty batch (N = 0 on every rank: VocabShards.agreed checked it) has nothing to send
            all_gather_single(everyone, packed, group=self.shards.group)
        everyone = everyone.view(self.shards.world, num_rows, packed.shape[1])
        floats = everyone[..., : 3 + self.padded].contiguous().view(stats_dtype)
        ids_all = everyone[..., 3 + self.padded :].to(torch.int64)
        return floats[..., 0], floats[..., 1], floats[..., 2], floats[..., 3:], ids_all

    def merge(self, max_all, log_sum_all, label_logits_all, values_all, ids_all) -> tuple[RawRowStats, torch.Tensor]:
        """Step 2's combination: global RawRowStats and the chosen candidates' slots in the [P * k_pad] order."""
        world, num_rows, padded = values_all.shape
        # m = max over the shards that hold mass, log_sum = log sum_p exp((m_p - m) + log_sum_p): every difference
        # is between two maxes, never through a rounded lse_p (backends/contract.py). A shard without mass
        # (log_sum_p = -inf: empty, or all -inf) must not set m, whatever shift its backend reported.
        has_mass = log_sum_all > float("-inf")
        row_max = torch.where(has_mass, max_all, float("-inf")).amax(0)
        shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        log_sum = torch.logsumexp(torch.where(has_mass, max_all - shift, 0.0) + log_sum_all, dim=0)
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
            row_max=shift,
            log_sum=log_sum,
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
        self,
        grad_row_loss,
        logits,
        rows_labels,
        local_labels,
        row_max,
        log_sum,
        local_ids,
        local_weights,
        inplace: bool,
    ):
        """Step 4: this shard's dL/dz = dL/dl * (-pi + label term if owned + its chosen beliefs' weights).

        dL/dl and row_max go through epilogue.backward_rows, as on one process (0 on ignored rows, a NaN row where the
        row has no distribution); both are the same on every rank, so the shard needs nothing from the others.
        """
        if self.shards.size == 0:
            return torch.zeros_like(logits)
        grad_rows, row_max = backward_rows(grad_row_loss, rows_labels, row_max)
        return self.backend.backward(
            grad_rows,
            logits,
            local_labels,
            row_max,
            log_sum,
            local_ids,
            local_weights,
            self.options.label_weight,
            inplace,
        )


def shard_backend(impl: str, device: torch.device, local_size: int) -> ModuleType | None:
    """The per-shard kernel backend (None for an empty shard); resolved before any collective, as it can fail."""
    name = resolve_impl(impl, device)
    if name == "reference":
        raise ValueError(
            'impl="reference" needs the whole vocabulary row; vocabulary-parallel logits need a kernel backend '
            '("auto", "torch", "native" or "triton"). To compare, gather the logits and call bs_token_loss.'
        )
    return get_backend(name, device) if local_size > 0 else None
