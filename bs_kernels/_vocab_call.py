"""What the ranks of a vocabulary-parallel call must agree on, as one fixed-size int64 record per rank.

Every rank sends its record (with its shard's start and size) in the call's first collective, an all_gather whose
size never depends on the call (VocabShards.agreed in _vocab_shards.py); only then come the collectives sized by the
batch and k. So ranks that disagree on the batch, top_k or the dtype raise the same ValueError, naming what differs,
instead of failing inside the collective on one rank and reading an unfilled buffer on another; and a rank whose
arguments fail a local check sends a failure record (the start of its message) instead of leaving the others waiting
in an all_gather until the process group's timeout.

Record layout (int64): status (0 = ready, 1 = failed), vocab_start, local size, the FIELDS below, then MESSAGE_WORDS
words holding the start of a failed rank's error message (UTF-8, zero-padded).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._options import REDUCTIONS, BSOptions

FORMS = ("logits", "lm_head")  # vocab_parallel_bs_token_loss / forget_logprobs, and the fused linear form
SHAPE_SLOTS = 6  # labels' dimensions sent one by one; any beyond fold (multiplied) into the last slot
MESSAGE_WORDS = 32  # 256 bytes of a failed rank's message
CHECKSUM_PRIME = 2_147_483_647  # 2^31 - 1: every product below stays under 2^62, every sum of < 2^32 rows < 2^63
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _dtype_code(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode())  # the same on every process, unlike id() or hash()


def _dtype_name(code: int) -> str:
    return next((str(dtype) for dtype in _FLOATING if _dtype_code(dtype) == code), f"a dtype of code {code}")


def _shape_slots(shape: tuple[int, ...]) -> list[int]:
    dims = list(shape[: SHAPE_SLOTS - 1])
    rest = 1
    for size in shape[SHAPE_SLOTS - 1 :]:
        rest *= size
    dims += [rest] if len(shape) >= SHAPE_SLOTS else []
    return [len(shape)] + dims + [0] * (SHAPE_SLOTS - len(dims))


def _show_shape(words: list[int]) -> str:
    ndim, dims = words[0], words[1:]
    if ndim >= SHAPE_SLOTS + 1:
        return f"{ndim}-D ({', '.join(map(str, dims[:-1]))}, ... product {dims[-1]})"
    return str(tuple(dims[:ndim]))


class Field(NamedTuple):
    name: str  # as the error message names it
    width: int  # int64 words
    show: Callable[[list[int]], str]


def _scalar(show: Callable[[int], object]) -> Callable[[list[int]], str]:
    return lambda words: str(show(words[0]))


SHAPE_FIELD = "labels shape (the batch)"
CHECKSUM_FIELD = "labels (a checksum of their values)"
# In the order a disagreement is reported; every field is compared exactly.
FIELDS = (
    Field("entry point", 1, _scalar(lambda code: FORMS[code] if 0 <= code < len(FORMS) else code)),
    Field("dtype", 1, _scalar(_dtype_name)),
    Field(SHAPE_FIELD, 1 + SHAPE_SLOTS, _show_shape),
    Field("shift", 1, _scalar(bool)),
    Field("hidden size", 1, _scalar(int)),
    Field("top_k", 1, _scalar(int)),
    Field("lam", 1, _scalar(_bits_float)),
    Field("belief_temperature", 1, _scalar(_bits_float)),
    Field("detach_belief", 1, _scalar(bool)),
    Field("ignore_index", 1, _scalar(int)),
    Field("reduction", 1, _scalar(lambda index: REDUCTIONS[index] if 0 <= index < len(REDUCTIONS) else index)),
    Field(CHECKSUM_FIELD, 1, _scalar(lambda value: f"{value:#x}")),
)
HEADER = 3  # status, vocab_start, local size
FIELDS_WIDTH = sum(field.width for field in FIELDS)
RECORD_LENGTH = HEADER + FIELDS_WIDTH + MESSAGE_WORDS
CHECKSUM_SLOT = HEADER + FIELDS_WIDTH - 1  # the last field: filled on the device (no host sync before the gather)


def labels_checksum(labels: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the labels mod 2^31 - 1 (a 0-d int64 tensor on their device): two ranks with
    different labels (values or order) get different sums unless they collide, with probability about 2^-31.

    Every label counts, the ones a shift drops too: the label range check, which runs after the exchange, reads
    them all, and must reach the same verdict on every rank."""
    flat = labels.reshape(-1).to(torch.int64)
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    terms = flat.remainder(CHECKSUM_PRIME) * positions.remainder(CHECKSUM_PRIME)
    return terms.remainder(CHECKSUM_PRIME).sum()


class CallRecord(NamedTuple):
    """One rank's call, as far as the other ranks must match it."""

    form: str
    dtype: torch.dtype
    shift: bool
    hidden_size: int  # 0 for the logits form
    options: BSOptions
    labels: torch.Tensor  # as given: their shape, and the checksum's input

    def fields(self) -> list[int]:
        """The FIELDS words, the checksum slot 0 (it is written on the device)."""
        options = self.options
        return [
            FORMS.index(self.form),
            _dtype_code(self.dtype),
            *_shape_slots(tuple(self.labels.shape)),
            int(self.shift),
            self.hidden_size,
            options.top_k,
            _float_bits(options.lam),
            _float_bits(options.belief_temperature),
            int(options.detach_belief),
            options.ignore_index,
            REDUCTIONS.index(options.reduction),
            0,
        ]


def ready_record(vocab_start: int, local_size: int, call: CallRecord, device: torch.device) -> torch.Tensor:
    """This rank's record [RECORD_LENGTH] int64 on ``device``, ready to be gathered."""
    words = [0, vocab_start, local_size, *call.fields()] + [0] * MESSAGE_WORDS
    record = torch.tensor(words, dtype=torch.int64, device=device)
    record[CHECKSUM_SLOT] = labels_checksum(call.labels.to(device))
    return record


def failed_record(error: BaseException, device: torch.device) -> torch.Tensor:
    """The record of a rank whose arguments failed a local check: status 1 and the start of its message."""
    text = f"{type(error).__name__}: {error}".encode()[: MESSAGE_WORDS * 8]
    message = torch.frombuffer(bytearray(text.ljust(MESSAGE_WORDS * 8, b"\0")), dtype=torch.int64).tolist()
    words = [1] + [0] * (HEADER - 1 + FIELDS_WIDTH) + message
    return torch.tensor(words, dtype=torch.int64, device=device)


def failure_text(record: list[int]) -> str | None:
    """None for a ready record; the (start of the) error message of a failed one."""
    if record[0] == 0:
        return None
    raw = torch.tensor(record[RECORD_LENGTH - MESSAGE_WORDS :], dtype=torch.int64).numpy().tobytes()
    return raw.rstrip(b"\0").decode(errors="ignore")  # a cut multi-byte character is dropped


def disagreements(records: list[list[int]]) -> list[str]:
    """'name (rank 0: a, rank 1: b)' for every field on which the ready records differ; [] when they all agree."""
    found, offset = {}, HEADER
    for field in FIELDS:
        values = [record[offset : offset + field.width] for record in records]
        if any(value != values[0] for value in values):
            per_rank = ", ".join(f"rank {rank}: {field.show(value)}" for rank, value in enumerate(values))
            found[field.name] = f"{field.name} ({per_rank})"
        offset += field.width
    if SHAPE_FIELD in found:  # labels of different shapes differ in value too: the checksum adds nothing
        found.pop(CHECKSUM_FIELD, None)
    return list(found.values())
