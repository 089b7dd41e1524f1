"""What every benchmark here shares: a synchronising timer, one peak-memory probe, GB/s and Markdown tables.

A provider on one input is a :class:`Bench`: a forward (returns the loss), an optional backward (given that loss),
a reset run before every call and never timed (clear the gradients, restore inputs a provider overwrites), and the
environment variables it runs under. The pytest-benchmark files and the side-by-side scripts measure the same
Bench objects (built in providers.py), so a table from either means the same thing:

- Time (:func:`time_bench`): one warm-up call, then ``rounds`` calls back to back, each as ``reset`` (untimed),
  synchronise, forward, synchronise, backward, synchronise, on the host clock (``time.perf_counter``); best and
  median are over the rounds. Rounds run in one block per provider, not round-robin over providers: a training
  loop calls one provider step after step, and on a VM the first touch of memory that another provider just freed
  in a different page layout (4 KiB vs 2 MiB pages) costs up to 0.4 s of kernel time, which round-robin would
  charge to whichever provider comes next. Synchronising after each phase puts the GPU's work inside the phase
  that queued it; it costs one host round trip (~10 µs) per phase, small against the milliseconds measured here.
  The process CPU time (all threads) is recorded beside the wall time: it is the steadier of the two when other
  jobs share the cores. pytest-benchmark times :func:`synchronized` (the same forward + backward + synchronise)
  with the same clock.
- Peak memory above the inputs (:func:`peak_memory`): one warm-up call, reset, then one measured call.
  CPU: the process's peak resident set size (VmHWM, reset to the current RSS through /proc/self/clear_refs) minus
  the RSS before the call, in a fresh process per provider, so that no provider reuses pages another one freed;
  glibc's mmap threshold is fixed there so that freed large blocks leave the RSS. CUDA: the growth of
  torch.cuda.max_memory_allocated over the allocation before the call, in this process (the caching allocator
  counts each tensor). What a call keeps (the inputs' gradients) is part of its peak; callers subtract it where
  their table says "above inputs and grads".
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

HERE = pathlib.Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30


def _nothing() -> None:
    return None


@dataclasses.dataclass
class Bench:
    """One provider on one input."""

    forward: Callable[[], Any]  # returns the loss; backward gets it
    backward: Callable[[Any], Any] | None = None  # None: only the forward is run and timed
    reset: Callable[[], None] = _nothing  # before every call, untimed
    environ: dict[str, str] = dataclasses.field(default_factory=dict)  # set around every call
    grad_bytes: int = 0  # bytes of the input gradients a call leaves behind

    def run(self) -> Any:
        result = self.forward()
        if self.backward is not None:
            self.backward(result)
        return result


def loss_backward(loss: torch.Tensor) -> None:
    loss.backward()


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def environ(variables: dict[str, str]) -> Iterator[None]:
    """Set ``variables`` in os.environ for the block, then restore what was there."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def synchronized(bench: Bench, device: torch.device | str) -> Callable[[], Any]:
    """bench.run followed by a synchronise: the function to hand to pytest-benchmark (reset goes in its setup)."""

    def run() -> Any:
        result = bench.run()
        synchronize(device)
        return result

    return run


@dataclasses.dataclass
class Timing:
    """Milliseconds per round: wall time of forward, backward and both, and the process CPU time of both."""

    forward_ms: list[float]
    backward_ms: list[float]
    wall_ms: list[float]
    cpu_ms: list[float]

    @property
    def best_ms(self) -> float:
        return min(self.wall_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.wall_ms)

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms)

    @property
    def median_forward_ms(self) -> float:
        return statistics.median(self.forward_ms)

    @property
    def median_backward_ms(self) -> float:
        return statistics.median(self.backward_ms)


def time_bench(bench: Bench, device: torch.device | str, *, rounds: int, warmup: int = 1) -> Timing:
    """``warmup`` untimed calls, then ``rounds`` timed ones back to back (see the module docstring)."""
    timing = Timing([], [], [], [])
    with environ(bench.environ):
        for _ in range(warmup):
            bench.reset()
            bench.run()
        for _ in range(rounds):
            bench.reset()
            synchronize(device)
            start_cpu, start = time.process_time(), time.perf_counter()
            result = bench.forward()
            synchronize(device)
            middle = time.perf_counter()
            if bench.backward is not None:
                bench.backward(result)
                synchronize(device)
            end, end_cpu = time.perf_counter(), time.process_time()
            timing.forward_ms.append((middle - start) * 1e3)
            timing.backward_ms.append((end - middle) * 1e3)
            timing.wall_ms.append((end - start) * 1e3)
            timing.cpu_ms.append((end_cpu - start_cpu) * 1e3)
        bench.reset()
    return timing


def gbps(bytes_moved: float, milliseconds: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second) of moving ``bytes_moved`` bytes in ``milliseconds``."""
    return bytes_moved / (milliseconds * 1e-3) / 1e9


@dataclasses.dataclass
class Memory:
    """One measured call: peak bytes above what was allocated before it, the absolute peak, and more."""

    above_inputs: int
    peak: int  # CPU: the process's peak RSS; CUDA: torch.cuda.max_memory_allocated
    seconds: float  # wall time of the measured call (one call; use time_bench for timings)
    value: float | None  # the forward's result as a float, when it is a number or a one-element tensor
    largest_block: int | None = None  # CUDA with trace_blocks: the largest single allocation during the call


def _status_bytes(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def measure_peak(bench: Bench, device: torch.device | str, *, trace_blocks: bool = False) -> Memory:
    """Peak memory of one call in this process. On CPU, only meaningful in a fresh process: use peak_memory."""
    device = torch.device(device)
    with environ(bench.environ):
        bench.reset()
        bench.run()  # warm-up: compilation, lazy allocations, optimiser state
        bench.reset()
        gc.collect()
        largest = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            if trace_blocks:
                # Python frames only: symbolising C++ stacks of every allocation can take minutes on a GPU host.
                torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
            start = time.perf_counter()
            value = bench.run()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated()
            if trace_blocks:
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                sizes = [e["size"] for trace in snapshot["device_traces"] for e in trace if e["action"] == "alloc"]
                largest = max(sizes, default=0)
        else:
            # The native kernels keep the last freed gradient's memory for the next one: give it back first, so the
            # call's own gradient is counted in its peak (the block is then kept again after the call).
            _release_native_gradient_pool()
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            before = _status_bytes("VmRSS")
            start = time.perf_counter()
            value = bench.run()
            seconds = time.perf_counter() - start
            peak = _status_bytes("VmHWM")
        result = Memory(peak - before, peak, seconds, _as_float(value), largest)
        bench.reset()
    return result


def _release_native_gradient_pool() -> None:
    from bs_kernels.backends import native

    native.release_gradient_pool()


def peak_memory(
    factory: Callable[..., Bench], kwargs: dict[str, Any], device: torch.device | str, *, trace_blocks: bool = False
) -> Memory:
    """Peak memory of one call of ``factory(**kwargs)``'s Bench: a fresh process on CPU, this process on CUDA.

    ``factory`` must be a module-level function of a file under benchmarks/ whose keyword arguments are
    JSON-serialisable (the fresh process imports the file and calls it again). ``trace_blocks`` (CUDA only) also
    records the largest single allocation.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return measure_peak(factory(**kwargs), device, trace_blocks=trace_blocks)
    request = {"file": inspect.getfile(factory), "name": factory.__qualname__, "kwargs": kwargs}
    command = [sys.executable, str(HERE / "harness.py"), "--peak-memory", json.dumps(request)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        what = f"{factory.__qualname__}({kwargs})"
        raise RuntimeError(f"memory measurement of {what} failed:\n{completed.stderr[-3000:]}")
    return Memory(**json.loads(completed.stdout.strip().splitlines()[-1]))


def _peak_memory_child(request_json: str) -> None:
    request = json.loads(request_json)
    path = pathlib.Path(request["file"])
    if path.parent.resolve() != HERE:
        raise ValueError(f"peak_memory's factory must live in {HERE}, not in {path}")
    module = importlib.import_module(path.stem)  # this process runs harness.py as a script: its folder is on sys.path
    bench = getattr(module, request["name"])(**request["kwargs"])
    print(json.dumps(dataclasses.asdict(measure_peak(bench, "cpu"))))


def markdown_row(cells: Sequence[Any]) -> str:
    """One Markdown table row; cells are written with str()."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines: the header, its separator, then the rows."""
    return [markdown_row(header), "|" + "---|" * len(header), *(markdown_row(row) for row in rows)]


def cell(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


def write_report(folder: pathlib.Path, name: str, text: str, payload: dict | None = None) -> None:
    """``text`` to folder/name.md and, when given, ``payload`` to folder/name.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(text + "\n")
    if payload is not None:
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def tiny() -> bool:
    """BS_BENCH_TINY=1: the pytest-benchmark files use tiny shapes (a check that every provider runs)."""
    return os.environ.get("BS_BENCH_TINY", "0") not in ("", "0")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
        import harness  # the same module object that providers.py imports

        harness._peak_memory_child(sys.argv[2])
    else:
        sys.exit("usage: harness.py --peak-memory REQUEST_JSON (started by harness.peak_memory)")
