"""The stage profile of a comparison: seconds and memory per stage, and where each training stage's steps spend
their time (results.json's ``profile``, printed at the end by the demo and TOFU commands).

Memory is the process's resident set (RSS, from /proc/self/status): at each stage's start and end and its peak
during the stage. The peak per stage needs the kernel's peak counter (VmHWM) reset at each stage's start, which
writing "5" to /proc/self/clear_refs does; where that is refused (not Linux, a locked-down /proc) a stage's peak is
None and only the process's peak since its start (``getrusage``) is recorded.
"""

from __future__ import annotations

import pathlib
import resource
import sys

from ..step_timing import PHASES, StepTimer
from .progress import Laps, Say

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def _status_mib(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MiB (None where there is none)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process to its current RSS; False where that is not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def process_peak_mib() -> float:
    """The process's peak RSS in MiB since it started or since the peak was last reset (ru_maxrss: KiB on Linux,
    bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Profile(Laps):
    """:class:`Laps` that also records, per stage, the RSS at its start and end and its peak, and holds the stages'
    :class:`StepTimer` s (``step_timer(name)``) and notes (``notes``: e.g. whether the fused path ran)."""

    def __init__(self, started: float | None = None) -> None:
        super().__init__(started)
        self.stages: list[dict] = []
        self.timers: dict[str, StepTimer] = {}
        self.notes: dict = {}
        self._rss_start = _status_mib("VmRSS")
        self._peak_resets = _reset_peak()

    def __call__(self, name: str) -> float:
        seconds = super().__call__(name)
        peak = _status_mib("VmHWM") if self._peak_resets else None
        rss = _status_mib("VmRSS")
        if peak is not None and rss is not None:
            peak = max(peak, rss)  # the kernel updates the peak lazily: it may lag the RSS just read
        self.stages.append(
            {"stage": name, "seconds": seconds, "rss_start_mib": self._rss_start, "rss_end_mib": rss, "peak_mib": peak}
        )
        self._rss_start = rss
        self._peak_resets = _reset_peak()
        return seconds

    def step_timer(self, name: str) -> StepTimer:
        """The step timer of the stage ``name`` (one per name: the runs of a matched search add up)."""
        return self.timers.setdefault(name, StepTimer())

    def to_dict(self) -> dict:
        return {
            "stages": list(self.stages),
            "total_seconds": self.with_total()["total"],
            # The resets also reset ru_maxrss: the process's peak is the largest of the stages' and the current one.
            "process_peak_mib": max([process_peak_mib(), *(stage["peak_mib"] or 0.0 for stage in self.stages)]),
            "steps": {name: timer.to_dict() for name, timer in self.timers.items()},
            **self.notes,
        }


def _mib(value) -> str:
    return "-" if value is None else f"{value / 1024:.2f}"


def profile_lines(profile: dict) -> list[str]:
    """A results.json ``profile`` as text: a line per stage (seconds, GiB at start / end / peak), then per training
    stage the seconds per step of each phase."""
    lines = [f"{'stage':<40} {'seconds':>8} {'GiB start':>9} {'GiB end':>8} {'GiB peak':>8}"]
    for stage in profile["stages"]:
        lines.append(
            f"{stage['stage'][:40]:<40} {stage['seconds']:>8.1f} {_mib(stage['rss_start_mib']):>9} "
            f"{_mib(stage['rss_end_mib']):>8} {_mib(stage['peak_mib']):>8}"
        )
    process_peak = _mib(profile["process_peak_mib"])
    lines.append(f"{'total':<40} {profile['total_seconds']:>8.1f} (process peak {process_peak} GiB)")
    if profile.get("steps"):
        lines.append(f"{'seconds per step':<40} {'steps':>6} " + " ".join(f"{phase:>9}" for phase in PHASES))
        for name, timer in profile["steps"].items():
            per_step = timer["seconds_per_step"]
            lines.append(
                f"{name[:40]:<40} {timer['steps']:>6} " + " ".join(f"{per_step[phase]:>9.3f}" for phase in PHASES)
            )
    for key in ("fused_linear",):
        if key in profile:
            lines.append(f"{key}: {profile[key]}")
    return lines


def show_profile(profile: dict, show: Say) -> None:
    """Print :func:`profile_lines`, a line at a time."""
    for line in profile_lines(profile):
        show(line)
