"""Result types shared by the ONNX and PyTorch sides: what was folded, what was left and why, and how the
folded model compares with the original. Plain dataclasses that render to text and to JSON-ready dicts."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class ExitCode(enum.IntEnum):
    """The process exit status of every bnfold command (documented in the README)."""

    OK = 0
    CHECK_FAILED = 1  # verification mismatch, audit found errors
    BAD_INPUT = 2  # unreadable/invalid input, bad usage, unwritable output
    INTERNAL_ERROR = 3  # a bnfold bug


def json_document(payload: dict) -> dict:
    """A JSON report as the command line prints it: ``producer`` (name and version of bnfold) first, so that a
    stored report says what made it."""
    from .version import __version__

    return {"producer": {"name": "bnfold", "version": __version__}, **payload}


@dataclass(frozen=True)
class Fold:
    """One normalization (or per-channel Mul/Add) absorbed into a linear op."""

    bn: str
    into: str
    rule: str
    graph: str = ""  # "" for the main graph, else the path of the subgraph (e.g. "If_0/then_branch")

    def to_dict(self) -> dict:
        d = {"bn": self.bn, "into": self.into, "rule": self.rule}
        if self.graph:
            d["graph"] = self.graph
        return d


@dataclass(frozen=True)
class Skip:
    """A normalization that stays in the model, with the reason it was not folded."""

    bn: str
    reason: str
    op_type: str = "BatchNormalization"
    graph: str = ""
    code: str = ""  # stable, machine-readable reason code (kebab-case); pipelines act on it, not on the wording

    def to_dict(self) -> dict:
        d = {"bn": self.bn, "reason": self.reason, "code": self.code, "op_type": self.op_type}
        if self.graph:
            d["graph"] = self.graph
        return d


@dataclass
class FoldReport:
    bn_before: int = 0
    bn_after: int = 0
    folded: list[Fold] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    def to_dict(self) -> dict:
        return {
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "folded": [f.to_dict() for f in self.folded],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
        }

    def summary_lines(self) -> list[str]:
        lines = [f"BatchNormalization nodes: {self.bn_before} before, {self.bn_after} after"]
        if self.folded:
            lines.append(f"folded ({len(self.folded)}):")
            lines += [f"  {f.bn} -> {f.into}  [{f.rule}]" + (f"  (in {f.graph})" if f.graph else "")
                      for f in self.folded]
        if self.skipped:
            lines.append(f"left in place ({len(self.skipped)}):")
            lines += [f"  {s.bn} ({s.op_type}): {s.reason}" + (f"  (in {s.graph})" if s.graph else "")
                      for s in self.skipped]
        lines += [f"note: {n}" for n in self.notes]
        return lines


def _json_float(x: float) -> float | str | None:
    """JSON has no NaN/inf; keep them readable instead of emitting invalid JSON."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


@dataclass
class OutputComparison:
    """Original vs folded on one output: worst absolute and relative error, and the tolerance applied."""

    name: str
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    passed: bool
    dtype: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "dtype": self.dtype,
        }


@dataclass
class ProviderResult:
    """Verification on one execution provider (or torch device)."""

    provider: str
    available: bool = True
    reason: str = ""  # why it was unavailable, or how it was run (e.g. emulated in float32)
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.available and all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        d = {
            "available": self.available,
            "passed": self.passed,
            "max_abs_error": _json_float(self.max_abs_error) if self.available else None,
            "max_rel_error": _json_float(self.max_rel_error) if self.available else None,
            "outputs": [o.to_dict() for o in self.outputs],
        }
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class VerifyReport:
    """Truthy when every available provider passed on every output and at least one provider ran."""

    providers: dict[str, ProviderResult] = field(default_factory=dict)
    seed: int = 0

    @property
    def passed(self) -> bool:
        ran = [r for r in self.providers.values() if r.available]
        return bool(ran) and all(r.passed for r in ran)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {name: r.to_dict() for name, r in self.providers.items()}

    def summary_lines(self) -> list[str]:
        lines = []
        for name, r in self.providers.items():
            if not r.available:
                lines.append(f"verify {name}: unavailable ({r.reason})")
                continue
            status = "PASSED" if r.passed else "FAILED"
            extra = f" ({r.reason})" if r.reason else ""
            lines.append(f"verify {name}: {status}{extra}")
            for o in r.outputs:
                mark = "ok" if o.passed else "MISMATCH"
                lines.append(
                    f"  {o.name}: max abs {o.max_abs_error:.3g}, max rel {o.max_rel_error:.3g}"
                    f" (atol {o.atol:g}, rtol {o.rtol:g}) {mark}"
                )
        return lines


@dataclass
class Timing:
    """Latency of one model or module, in milliseconds: the median and spread (10th/90th percentiles) of the
    timed samples. What one sample is depends on who measured it (one run per input batch, in both benchmarks)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        import numpy as np  # here, not at the top: the command line imports this module and starts without numpy

        arr = np.asarray(samples_ms, dtype=np.float64)
        p10, med, p90 = np.percentile(arr, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), float(arr.min()), [float(s) for s in samples_ms])

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "min_ms": self.min_ms,
            "samples": len(self.samples_ms),
        }
