"""Result types shared by the ONNX and PyTorch sides: what was folded, what was left and why, and how the
folded model compares with the original. Plain dataclasses that render to text and to JSON-ready dicts."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class ExitCode(enum.IntEnum):
    """The process exit status of every bnfold command (documented in the README)."""

    OK = 0
    CHECK_FAILED = 1  # verification mismatch, invalid BatchNorm statistics, audit found errors
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


@dataclass(frozen=True)
class Merge:
    """Linear ops merged into one (structural reparameterization): ``into`` survives, ``removed`` are gone."""

    rule: str
    into: str
    removed: tuple[str, ...]
    graph: str = ""
    absorbed: tuple[str, ...] = ()  # the BatchNormalizations among ``removed``: each is also a fold

    def folds(self) -> list["Fold"]:
        """The BNs this merge absorbed as folds by the merge's rule, so that every BN that goes is in ``folded``."""
        return [Fold(bn, self.into, self.rule, graph=self.graph) for bn in self.absorbed]

    def to_dict(self) -> dict:
        d = {"rule": self.rule, "into": self.into, "removed": list(self.removed)}
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
    merged: list[Merge] = field(default_factory=list)  # branch merges, in the order they were made
    not_merged: list[Skip] = field(default_factory=list)  # branch structures left as they are, with the reason

    @property
    def modified(self) -> bool:
        return bool(self.folded) or bool(self.merged)

    def to_dict(self) -> dict:
        return {
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "folded": [f.to_dict() for f in self.folded],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "merged": [m.to_dict() for m in self.merged],
            "not_merged": [s.to_dict() for s in self.not_merged],
        }

    def summary_lines(self) -> list[str]:
        lines = [f"BatchNormalization nodes: {self.bn_before} before, {self.bn_after} after"]
        if self.folded:
            lines.append(f"folded ({len(self.folded)}):")
            lines += [f"  {f.bn} -> {f.into}  [{f.rule}]" + (f"  (in {f.graph})" if f.graph else "")
                      for f in self.folded]
        lines += _skip_lines("left in place", self.skipped)
        if self.merged:
            lines.append(f"merged ({len(self.merged)}):")
            lines += [f"  {', '.join(m.removed)} -> {m.into}  [{m.rule}]" + (f"  (in {m.graph})" if m.graph else "")
                      for m in self.merged]
        lines += _skip_lines("not merged", self.not_merged)
        lines += [f"note: {n}" for n in self.notes]
        return lines


def _skip_lines(title: str, skips: "list[Skip]") -> list[str]:
    """A heading and one line per refusal (a fold's or a merge's), as the text report writes them."""
    if not skips:
        return []
    where = [f"  (in {s.graph})" if s.graph else "" for s in skips]
    return [f"{title} ({len(skips)}):"] + [f"  {s.bn} ({s.op_type}): {s.reason}{w}" for s, w in zip(skips, where)]


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
    """Original vs candidate on one output (the rule is in :mod:`bnfold.verify`'s docstring).

    ``max_abs_error`` = max |a − b|; ``scale`` = max |b|; ``scaled_error`` = max_abs_error / scale. Under the noise
    rule: ``noise`` (measured), ``noise_scale`` (with the one-ulp floor), ``ratio`` = max_abs_error / noise_scale,
    passing when ``ratio <= limit``. With explicit tolerances, ``atol``/``rtol`` are set and the noise fields None.
    Integer, bool and string outputs: exact match, noise fields None."""

    name: str
    max_abs_error: float
    scale: float
    scaled_error: float
    noise: float | None
    noise_scale: float | None
    ratio: float | None
    passed: bool
    dtype: str = ""
    limit: float | None = None
    atol: float | None = None
    rtol: float | None = None
    top1_agreement: float | None = None

    @property
    def rule(self) -> str:
        if self.atol is not None or self.rtol is not None:
            return "tolerance"
        return "noise" if self.limit is not None else "exact"

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "passed": self.passed,
            "dtype": self.dtype,
            "rule": self.rule,
            "max_abs_error": _json_float(self.max_abs_error),
            "scale": _json_float(self.scale),
            "scaled_error": _json_float(self.scaled_error),
        }
        if self.rule == "noise":
            d.update(noise=_json_float(self.noise), noise_scale=_json_float(self.noise_scale),
                     ratio=_json_float(self.ratio), limit=self.limit)
        elif self.rule == "tolerance":
            d.update(atol=self.atol, rtol=self.rtol)
        if self.top1_agreement is not None:
            d["top1_agreement"] = self.top1_agreement
        return d

    def summary(self) -> str:
        """One line: ``name: max abs E (S of scale M), noise N, ratio R (limit K) ok|MISMATCH``."""
        mark = "ok" if self.passed else "MISMATCH"
        if math.isinf(self.max_abs_error) and self.scale == 0:
            return f"{self.name}: not comparable {mark}"
        text = f"{self.name}: max abs {self.max_abs_error:.3g}"
        if self.rule != "exact":
            text += f" ({self.scaled_error:.2g} of scale {self.scale:.3g})"
        if self.rule == "noise":
            text += f", noise {self.noise_scale:.3g}, ratio {self.ratio:.3g} (limit {self.limit:g})"
        elif self.rule == "tolerance":
            text += f" (atol {self.atol:g}, rtol {self.rtol:g})"
        else:
            text += " (exact match required)"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.2%}"
        return f"{text} {mark}"


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
    def max_ratio(self) -> float | None:
        """The largest noise ratio over the outputs judged by the noise rule, or None."""
        ratios = [o.ratio for o in self.outputs if o.ratio is not None]
        return max(ratios) if ratios else None

    def to_dict(self) -> dict:
        d = {
            "available": self.available,
            "passed": self.passed,
            "max_abs_error": _json_float(self.max_abs_error) if self.available else None,
            "max_ratio": _json_float(self.max_ratio) if self.max_ratio is not None else None,
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
            lines += [f"  {o.summary()}" for o in r.outputs]
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
