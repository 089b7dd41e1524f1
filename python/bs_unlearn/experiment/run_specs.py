"""Run specifications: "bs-t:lam=0.5,lr=1e-4" -> RunSpec("bs-t", {"lam": 0.5, "lr": 1e-4}), with its label."""

from __future__ import annotations

import dataclasses
import math

from ..config import METHODS, ObjectiveConfig, check_int, check_real


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """'5e-4/1.5e-3' -> (5e-4, 1.5e-3): a run's own learning-rate grid (``/`` separates, since ``,`` separates
    options)."""
    rates = tuple(float(item) for item in text.split("/"))
    if not all(rate > 0 and math.isfinite(rate) for rate in rates):
        raise ValueError(f"lr_grid rates must be finite and > 0, got {text!r}")
    return rates


def _checked(name: str, convert, check, **bounds):
    """A run option's parser: ``convert`` the text, then ``check`` its range (an error names the option), so a NaN
    or infinite value is refused when the spec is read, not after minutes of runs before it."""

    def parse(text: str):
        value = convert(text)
        check(name, value, **bounds)
        return value

    return parse


# The options a run spec may set ("bs-t:lam=0.5,lr=1e-4"): ObjectiveConfig fields, the BS-S sample count, the lr
# (fixed) or the run's own lr grid for the matched protocol (in place of the comparison's).
RUN_OPTION_TYPES = {
    "lam": _checked("lam", float, check_real, low=0.0, high=1.0),
    "top_k": _checked("top_k", int, check_int, low=1),
    "lam_s": _checked("lam_s", float, check_real, low=0.0, high=1.0),
    "bs_s_base": str,
    "num_beliefs": _checked("num_beliefs", int, check_int, low=1),
    "lr": _checked("lr", float, check_real, low=0.0, low_open=True),
    "lr_grid": parse_lr_grid,
}
METHOD_NAMES = {"graddiff": "GA (+retain NLL)", "ga": "GA", "bs-t": "BS-T", "bs-s": "BS-S", "npo": "NPO"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One unlearning run: a method and its options (``lr`` among them, if the spec fixes it)."""

    method: str
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def lr(self) -> float | None:
        return self.options.get("lr")

    @property
    def lr_grid(self) -> tuple[float, ...] | None:
        return self.options.get("lr_grid")

    @property
    def objective_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k not in ("lr", "lr_grid", "num_beliefs")}

    @property
    def label(self) -> str:
        label = METHOD_NAMES.get(self.method, self.method)
        lam = self.options.get("lam", ObjectiveConfig.lam)
        shown = {"lam", "lam_s", "bs_s_base"}
        if self.method == "bs-t":
            label += f" λ={lam:g}"
        elif self.method == "bs-s":
            base = self.options.get("bs_s_base", ObjectiveConfig.bs_s_base).replace("-", "_")
            base_name = {"ga": "GA", "bs_t": f"BS-T λ={lam:g}", "npo": "NPO"}.get(base, base)
            label += f" λs={self.options.get('lam_s', ObjectiveConfig.lam_s):g} ({base_name} base)"
        else:
            shown = set()
        extras = [f"{k}={format_option(v)}" for k, v in self.options.items() if k not in shown]
        return label + (f" ({', '.join(extras)})" if extras else "")

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label (``probe_<slug>.json``)."""
        text = self.label.lower().replace(" ", "_").replace("λ", "lam").replace("+", "").replace("(", "")
        return "".join(c for c in text.replace(")", "").replace(",", "") if c.isalnum() or c in "_.=-")


def format_option(value) -> str:
    """A run option as a spec writes it: an lr grid as ``0.0005/0.0015``, not as a tuple."""
    return "/".join(f"{rate:g}" for rate in value) if isinstance(value, tuple) else str(value)


def parse_run(spec: str) -> RunSpec:
    """'bs-t:lam=0.5,top_k=10' -> RunSpec("bs-t", {"lam": 0.5, "top_k": 10})."""
    method, _, options = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"--runs: unknown method {method!r} in {spec!r} (choose from {', '.join(sorted(METHODS))})")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in RUN_OPTION_TYPES:
            raise ValueError(f"--runs: bad option {item!r} in {spec!r} (options: {', '.join(RUN_OPTION_TYPES)})")
        try:
            parsed[key] = RUN_OPTION_TYPES[key](value)
        except ValueError as error:
            raise ValueError(f"--runs: bad value in {item!r}: {error}") from error
    if "lr" in parsed and "lr_grid" in parsed:
        raise ValueError(f"--runs: {spec!r} sets both lr and lr_grid; give one (a fixed lr or the run's grid)")
    return RunSpec(method, parsed)
