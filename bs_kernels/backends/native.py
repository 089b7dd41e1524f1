"""impl="native": the C++ CPU kernels of csrc/bs_token_native.cpp, loaded prebuilt or built just in time.

Where the library comes from, first match wins (csrc/README.md):
1. Prebuilt: a wheel built with ``BS_KERNELS_BUILD_NATIVE=1`` (setup.py) holds ``bs_kernels/_native_<key>*.so``,
   compiled ahead of time for the build key below. It is loaded when its key is the key of this process (same
   source, flags, torch version and ABI, platform); otherwise it is ignored.
2. Just in time (the default): the package's build system has only setuptools (an isolated build must not download
   a second torch), so the extension is compiled with torch.utils.cpp_extension and ninja the first time a CPU
   backend is resolved, into a cache folder keyed the same way:
       $BS_KERNELS_CACHE (default $XDG_CACHE_HOME/bs_kernels or ~/.cache/bs_kernels) / native-<key>/
   Later processes load the cached library directly (no compiler, no ninja needed), once it matches the size and
   sha256 its build recorded beside it (bs_kernels_native.so.sha256): the dynamic loader dies with SIGBUS on a
   library cut short (a full disk, a damaged cache), so one that does not match is rebuilt from scratch, with one
   warning saying why.
The source is the top-level csrc/ of the repository in an editable install or a source tree, and its copy inside the
package (bs_kernels/csrc/, put there by setup.py's build_py) in a wheel, so every install builds the same file.

A build that fails makes ``unavailable_reason`` return why and how to rebuild; ``impl="auto"`` then resolves to
``"torch"`` and warns once per process, an explicit ``impl="native"`` raises RuntimeError with the same message.

Concurrent builds: processes building the same key take turns on ``native-<key>/build.lock``, an ``fcntl.flock``
lock that the OS releases when its holder exits, however it dies (SIGKILL, OOM). cpp_extension's own ``lock`` file
is only created and removed around a build by a live process; one that a killed builder left behind would make
every later build wait forever, so the holder of build.lock deletes any ``lock`` it finds (no live builder can own
it then). A process waits at most $BS_KERNELS_BUILD_TIMEOUT seconds (default 600) for another's build, then treats
the kernel as unavailable for this process, exactly as after a failed build.
Rebuild (verbose) with ``python -m bs_kernels.backends.native``; ``BS_KERNELS_DISABLE_NATIVE=1`` turns it off.

Operators (torch.ops.bs_kernels.*; fake implementations below so opcheck / torch.compile can trace them):
    native_forward(logits[N, V], labels[N], top_k)
        -> (row_max[N], log_sum[N], label_logits[N], belief_logits[N, k], belief_ids[N, k])
    native_backward(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight) -> grad
    native_backward_(same arguments) -> ()  writes the gradient into logits
    native_forward_grad(logits, labels, top_k, grad_rows) -> (the five forward outputs, grad[N, V]): the forward
        and, per row while it is in cache, the dense part -grad_rows[i] * pi_i of the gradient (forward_grad below)
    native_forward_grad_(same arguments) -> (the five forward outputs)  that dense part written into logits
    native_sparse_grad_(grad, grad_rows, labels, row_max, log_sum, label_logits, belief_logits, belief_ids,
        belief_weights, label_weight) -> ()  then the k + 1 sparse terms of each row, in place (sparse_grad_ below)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import os
import pathlib
import platform
import sys
import threading
import time
import warnings

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process build lock, cpp_extension's own lock file only
    fcntl = None

import torch

from .._dtypes import compute_dtype
from .contract import RawRowStats

NAME = "native"

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
SOURCE_NAME = "bs_token_native.cpp"
EXTENSION_NAME = "bs_kernels_native"
PREBUILT_PREFIX = "_native_"  # bs_kernels/_native_<key><extension suffix>, from setup.py with BUILD_ENV=1
BUILD_ENV = "BS_KERNELS_BUILD_NATIVE"
CACHE_ENV = "BS_KERNELS_CACHE"
DISABLE_ENV = "BS_KERNELS_DISABLE_NATIVE"
REBUILD_COMMAND = "python -m bs_kernels.backends.native"
BUILD_TIMEOUT_ENV = "BS_KERNELS_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT_S = 600.0  # a cold build takes ~16 s on one free core; a loaded machine can take minutes
BUILD_LOCK_NAME = "build.lock"  # ours, held with flock; "lock" is cpp_extension's
LIBRARY_RECORD_SUFFIX = ".sha256"  # beside the cached library: its size and sha256, written by its build

# -O3 and -ffp-contract=fast (fused multiply-adds in the exp polynomial; -std=c++20 turns contraction off by
# default). No -march: the source compiles AVX-512 / AVX2 variants itself and picks one at run time, so the cache
# can be shared between machines. -fopenmp makes at::parallel_for use torch's OpenMP thread pool (torch ships
# libgomp.so.1, which the extension then shares).
CFLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-Wall", "-Wextra")
LDFLAGS = ("-fopenmp",)


def find_source() -> pathlib.Path:
    """The C++ source: inside the installed package (a wheel), else the repository's csrc/ (editable, source tree)."""
    candidates = (PACKAGE_DIR / "csrc" / SOURCE_NAME, PACKAGE_DIR.parent / "csrc" / SOURCE_NAME)
    return next((path for path in candidates if path.is_file()), candidates[-1])


SOURCE = find_source()

_lock = threading.Lock()
_library_path: str | None = None
_build_error: str | None = None
_warned = False
_rebuild_warned: set[str] = set()  # libraries whose rebuild this process announced


def cache_root() -> pathlib.Path:
    """The folder under which each build lives in its own native-<key> subfolder."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "bs_kernels"


def build_key(source: pathlib.Path, cflags: tuple[str, ...] = CFLAGS) -> str:
    """Everything the compiled library depends on: source, flags, torch version and ABI, platform."""
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for part in (
        " ".join(cflags),
        " ".join(LDFLAGS),
        torch.__version__,
        str(torch._C._GLIBCXX_USE_CXX11_ABI),
        sys.platform,
        platform.machine(),
    ):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def prebuilt_name(key: str) -> str:
    """The module name (below bs_kernels) of the library built ahead of time for build key ``key``."""
    return f"{PREBUILT_PREFIX}{key}"


def prebuilt_library(source: pathlib.Path | None = None) -> pathlib.Path | None:
    """The library built ahead of time into the package for this process's build key, or None if there is none."""
    source = SOURCE if source is None else source
    if not source.is_file():
        return None
    name = prebuilt_name(build_key(source))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = PACKAGE_DIR / f"{name}{suffix}"
        if library.is_file():
            return library
    return None


def build(
    source: pathlib.Path | None = None,
    *,
    build_directory: pathlib.Path | None = None,
    extra_cflags: tuple[str, ...] = (),
    verbose: bool = False,
) -> str:
    """Compile ``source`` (default: SOURCE) or reuse its cached build, load it into torch.ops; returns its path.

    A cached library is loaded only if it matches the size and sha256 its build recorded beside it
    (``library_problem``); otherwise it is rebuilt from scratch, with one warning saying why. Raises whatever the
    compiler or ninja raised. ``extra_cflags`` (e.g. ``("-Werror",)``) take part in the key.
    """
    from torch.utils import cpp_extension  # imported here: it is slow to import and only needed for a build

    source = SOURCE if source is None else source
    cflags = CFLAGS + tuple(extra_cflags)
    if build_directory is None:
        build_directory = cache_root() / f"native-{build_key(source, cflags)}"
    library = build_directory / f"{EXTENSION_NAME}.so"
    cpp_extension_lock = build_directory / "lock"
    # A finished, intact build: load it without ninja. While cpp_extension's "lock" file exists (a build in
    # progress, or the leftover of a killed one), go through the build lock below instead of loading a half-written
    # library; a library that does not match its record would crash the loader (SIGBUS on a truncated file).
    if library.is_file() and not cpp_extension_lock.exists() and library_problem(library) is None:
        torch.ops.load_library(str(library))
        return str(library)
    build_directory.mkdir(parents=True, exist_ok=True)
    with build_lock(build_directory):
        # We hold build.lock, so no live process of ours is inside cpp_extension.load for this folder: a "lock"
        # file here was left by a builder that died, and cpp_extension would wait for it forever.
        cpp_extension_lock.unlink(missing_ok=True)
        if library.exists():
            problem = library_problem(library)
            if problem is None:  # another process finished this build while we waited for the lock
                torch.ops.load_library(str(library))
                return str(library)
            _warn_rebuild(library, problem)
            clear_build(library)
        path = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(source)],
            extra_cflags=list(cflags),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_directory),
            is_python_module=False,
            verbose=verbose,
        )
        write_library_record(pathlib.Path(path))
        return path


def library_record(library: pathlib.Path) -> pathlib.Path:
    """Where a build records its library's size and sha256: ``<library>.sha256``, beside it."""
    return library.with_name(library.name + LIBRARY_RECORD_SUFFIX)


def _size_and_digest(library: pathlib.Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(library, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return library.stat().st_size, digest.hexdigest()


def write_library_record(library: pathlib.Path) -> None:
    """Record the just-built library's size and sha256 ("<size> <sha256>"), atomically: a reader sees all or none."""
    size, digest = _size_and_digest(library)
    record = library_record(library)
    partial = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    partial.write_text(f"{size} {digest}\n")
    os.replace(partial, record)


def library_problem(library: pathlib.Path) -> str | None:
    """None if the cached ``library`` is what its build wrote (size and sha256 of its record); otherwise why not.

    A library cut short (a full disk, a killed copy, a damaged cache) makes the dynamic loader die with SIGBUS or
    fail with an unrelated message, so nothing is loaded from the cache unchecked. Hashing takes about a
    millisecond per MB.
    """
    try:
        words = library_record(library).read_text().split()
        expected_size, expected_digest = int(words[0]), words[1]
    except (OSError, ValueError, IndexError):
        return "it has no readable size/sha256 record (its build was interrupted or predates the record)"
    try:
        size, digest = _size_and_digest(library)
    except OSError as error:
        return f"it cannot be read ({error})"
    if size != expected_size:
        return f"it has {size} bytes where its build wrote {expected_size}"
    if digest != expected_digest:
        return "its sha256 differs from the one its build recorded"
    return None


def clear_build(library: pathlib.Path) -> None:
    """Remove a damaged build's outputs (the library, its record, the object files), so that ninja recompiles: it
    would take a damaged file whose timestamp is newer than the source for up to date."""
    for path in (library, library_record(library), *library.parent.glob("*.o")):
        path.unlink(missing_ok=True)


def _warn_rebuild(library: pathlib.Path, problem: str) -> None:
    if str(library) in _rebuild_warned:
        return
    _rebuild_warned.add(str(library))
    warnings.warn(
        f"the cached native library {library} does not match its build: {problem}; rebuilding it",
        RuntimeWarning,
        stacklevel=3,
    )


def build_timeout_s() -> float:
    """How long to wait for another process's build of the same key ($BS_KERNELS_BUILD_TIMEOUT, seconds)."""
    text = os.environ.get(BUILD_TIMEOUT_ENV, "")
    try:
        timeout = float(text) if text else DEFAULT_BUILD_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{BUILD_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not timeout >= 0:
        raise ValueError(f"{BUILD_TIMEOUT_ENV} must be >= 0 seconds, got {text!r}")
    return timeout


class BuildLockTimeout(TimeoutError):
    """Another live process held the build lock for longer than build_timeout_s()."""


@contextlib.contextmanager
def build_lock(build_directory: pathlib.Path, timeout_s: float | None = None):
    """Hold ``build_directory/build.lock`` (an exclusive flock) for the duration of a build.

    The OS drops a flock when the process holding it exits, so a killed builder never blocks the next one. Waits
    at most ``timeout_s`` (default build_timeout_s()) for a live holder, then raises BuildLockTimeout naming it.
    """
    if fcntl is None:
        yield
        return
    timeout_s = build_timeout_s() if timeout_s is None else timeout_s
    path = build_directory / BUILD_LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise BuildLockTimeout(
                        f"waited {timeout_s:g} s for the native build of another process (pid {holder}) holding "
                        f"{path}; raise {BUILD_TIMEOUT_ENV} to wait longer"
                    ) from None
                time.sleep(0.1)
        # The holder's pid, for the message of a process that times out waiting for it.
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the flock


def _failure_message(error: BaseException) -> str:
    if isinstance(error, BuildLockTimeout):
        return (
            f'impl="native" is unavailable in this process: {error}. impl="auto" uses impl="torch" on CPU meanwhile; '
            "a later process loads the library once that build has finished."
        )
    text = str(error)
    # A failed ninja build's message repeats the whole compiler command; the compiler's own "error:" lines say why.
    compiler_errors = [line.strip() for line in text.splitlines() if "error:" in line or "fatal" in line.lower()]
    detail = " | ".join(compiler_errors[:3]) if compiler_errors else " ".join(text.split())
    if len(detail) > 500:
        detail = detail[:500] + " ..."
    return (
        f'impl="native" is unavailable: building the C++ kernel {SOURCE.name} failed ({type(error).__name__}: '
        f"{detail}). It needs a C++20 compiler and ninja (pip install ninja), or a wheel built ahead of time with "
        f"{BUILD_ENV}=1 for this torch (see csrc/README.md). Rebuild and see the compiler output with "
        f"`{REBUILD_COMMAND}` (cache: {cache_root()}, set {CACHE_ENV} to move it); until then "
        'impl="auto" uses impl="torch" on CPU.'
    )


def load() -> str:
    """Load the prebuilt library if there is one for this build key, else build (or reuse) the just-in-time one."""
    library = prebuilt_library()
    if library is None:
        return build()
    torch.ops.load_library(str(library))
    return str(library)


def _ensure_built() -> str | None:
    """Load or build the extension once per process; None on success, else the failure message."""
    global _library_path, _build_error
    if _library_path is not None or _build_error is not None:  # lock-free once decided (torch.compile traces this)
        return _build_error
    with _lock:
        if _library_path is None and _build_error is None:
            try:
                _library_path = load()
                _register_fakes()
            except Exception as error:  # a compiler/ninja/loader failure of any kind means "unavailable"
                _build_error = _failure_message(error)
        return _build_error


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernel is built (building it on first call); otherwise why not and how to fix it."""
    global _warned
    device = torch.device(device)
    if device.type != "cpu":
        return f'impl="native" runs on CPU tensors only, got device {device}; use impl="auto" or "triton" there.'
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return f'impl="native" is disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}; unset it to use the C++ kernel.'
    reason = _ensure_built()
    if reason is not None and not _warned:
        # The one warning for a failed build: "auto" falls back silently after this.
        _warned = True
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return reason


def isa() -> str:
    """The instruction set the kernels run with on this CPU ("avx512", "avx2" or "default")."""
    _require_built()
    return torch.ops.bs_kernels.native_isa()


def _require_built() -> None:
    reason = _ensure_built()
    if reason is not None:
        raise RuntimeError(reason)


def forward(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> RawRowStats:
    """One pass per row; see bs_kernels/backends/contract.py. logits [N, V], labels [N] int64 (-1 = ignored)."""
    _require_built()
    return RawRowStats(*torch.ops.bs_kernels.native_forward(logits, labels, top_k))


def backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
    inplace: bool,
) -> torch.Tensor:
    """grad [N, V] in the logits' dtype (the contract's formula); written into ``logits`` when ``inplace``."""
    _require_built()
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, float(label_weight))
    if inplace and logits.stride(-1) == 1:
        torch.ops.bs_kernels.native_backward_(*arguments)
        return logits
    return torch.ops.bs_kernels.native_backward(*arguments)


def forward_grad(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int, grad_rows: torch.Tensor, inplace: bool
) -> tuple[RawRowStats, torch.Tensor]:
    """forward() and, in the same pass over each row, grad[i] = -grad_rows[i] * pi_i: the contract's gradient
    without its k + 1 sparse terms (sparse_grad_ writes those), pi_i = exp((z - m) - log_sum) as in backward. Rows
    with grad_rows 0 get zeros, counted rows whose m or log_sum is not finite get NaN (what backward_rows makes of
    them). Into ``logits`` itself when ``inplace``."""
    _require_built()
    if inplace and logits.stride(-1) == 1:
        outputs = torch.ops.bs_kernels.native_forward_grad_(logits, labels, top_k, grad_rows)
        grad = logits
    else:
        *outputs, grad = torch.ops.bs_kernels.native_forward_grad(logits, labels, top_k, grad_rows)
    return RawRowStats(*outputs), grad


def sparse_grad_(
    grad: torch.Tensor,
    grad_rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    raw: RawRowStats,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
) -> None:
    """Rewrite the k + 1 sparse entries of each row of forward_grad's ``grad`` as the contract's
    grad_rows * (coef - pi), from the forward's statistics ``raw`` (backward's own code, so with the grad_rows and
    row_max of backward_rows and the epilogue's log_sum the gradient equals native_backward's); rows with
    grad_rows 0 are left as they are."""
    _require_built()
    torch.ops.bs_kernels.native_sparse_grad_(
        grad, grad_rows, labels, row_max, log_sum, raw.label_logits, raw.belief_logits, belief_ids, belief_weights,
        float(label_weight),
    )  # fmt: skip


def _register_fakes() -> None:
    """Shape/dtype-only implementations for FakeTensor tracing (torch.compile, opcheck); registered once."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("bs_kernels::native_forward")
    def _forward_fake(logits, labels, top_k):
        num_rows = logits.shape[0]
        stats_dtype = compute_dtype(logits.dtype)
        return (
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows, top_k), dtype=stats_dtype),
            logits.new_empty((num_rows, top_k), dtype=torch.int64),
        )

    @torch.library.register_fake("bs_kernels::native_backward")
    def _backward_fake(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("bs_kernels::native_backward_")
    def _backward_inplace_fake(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight):
        return None

    @torch.library.register_fake("bs_kernels::native_forward_grad")
    def _forward_grad_fake(logits, labels, top_k, grad_rows):
        return (*_forward_fake(logits, labels, top_k), logits.new_empty(logits.shape))

    @torch.library.register_fake("bs_kernels::native_forward_grad_")
    def _forward_grad_inplace_fake(logits, labels, top_k, grad_rows):
        return _forward_fake(logits, labels, top_k)

    @torch.library.register_fake("bs_kernels::native_sparse_grad_")
    def _sparse_grad_fake(
        grad, grad_rows, labels, row_max, log_sum, label_logits, belief_logits, belief_ids, belief_weights, w
    ):
        return None

    _register_fakes.done = True


def _main() -> int:
    """Rebuild verbosely (python -m bs_kernels.backends.native) and print where the library is and what ISA runs."""
    print(f"source: {SOURCE}\ncache:  {cache_root()}")
    prebuilt = prebuilt_library()
    if prebuilt is not None:
        print(f'prebuilt: {prebuilt} (what impl="native" loads; the build below is only for diagnosis)')
    try:
        path = build(verbose=True)
    except Exception as error:
        print(_failure_message(error), file=sys.stderr)
        return 1
    print(f"built:  {path}\nisa:    {torch.ops.bs_kernels.native_isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
