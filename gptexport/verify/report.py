"""The parity report: a table for people, JSON for machines, a plot of the logit error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GptExportError
from .checks import Check
from .tolerance import Tolerance


@dataclass
class ParityReport:
    """Every check's verdict; truthy when all pass and at least one backend ran."""

    tolerance: Tolerance
    reference: str
    model_dir: str
    settings: dict = field(default_factory=dict)  # prompts, steps, sampling, seed
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it could not run
    notes: list[str] = field(default_factory=list)

    @property
    def backends_run(self) -> list[str]:
        return list(dict.fromkeys(c.backend for c in self.checks if c.backend != "-"))

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def __bool__(self) -> bool:
        return bool(self.backends_run) and not self.failures()

    def verdict(self) -> str:
        if not self.backends_run:
            return "NOT OK: no backend could run here (all skipped), so nothing was checked"
        if self.failures():
            return "NOT OK: failed " + ", ".join(f"{c.name} ({c.backend})" for c in self.failures())
        return (f"OK: {len(self.checks)} checks pass on {', '.join(self.backends_run)} "
                f"(tolerance {self.tolerance.name}: atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g})")

    def table(self) -> str:
        """The short human table: one row per check, then the skipped backends, then the verdict."""
        rows = [("backend", "check", "result", "figure")]
        rows += [(c.backend, c.name, "OK" if c.ok else "NOT OK", c.figure) for c in self.checks]
        rows += [(name, "-", "skipped", reason) for name, reason in self.skipped.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        return "\n".join([*lines, *[f"note: {n}" for n in self.notes], self.verdict()])

    def to_json(self) -> dict:
        """Every number, JSON-safe (inf and NaN become strings)."""
        return _json_safe({
            "passed": bool(self), "verdict": self.verdict(), "reference": self.reference,
            "model_dir": self.model_dir, "tolerance": asdict(self.tolerance), "settings": self.settings,
            "checks": [asdict(c) for c in self.checks], "skipped": self.skipped, "notes": self.notes,
        })


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def plot_report(report: ParityReport, path: str | Path) -> Path:
    """A PNG of the per-position max |logit error| of each backend, log scale, decode steps shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptExportError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(10, 4))
    forward = [c for c in report.checks if c.name == "forward"]
    for c in forward:
        ax.plot(np.maximum(c.details["per_position"]["max_abs"], 1e-12), lw=1, marker=".", label=c.backend)
    if forward:
        for i, label in enumerate(forward[0].details["per_position"]["labels"]):
            if " decode " in label:
                ax.axvspan(i - 0.5, i + 0.5, color="0.92", lw=0)
            elif label.endswith(" prefill 0") and i:  # where the next prompt starts
                ax.axvline(i - 0.5, color="0.6", lw=0.5, ls=":")
    ax.axhline(report.tolerance.atol, color="tab:red", ls="--", lw=1, label=f"atol {report.tolerance.atol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("position: each prompt's prefill, then its decode steps (shaded)")
    ax.set_ylabel("max |logit - PyTorch|")
    ax.set_title(f"{Path(report.model_dir).name}: logit error against the PyTorch reference"
                 + ("" if forward else " (no backend ran)"))
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise GptExportError(f"{path}: cannot write plot ({e.strerror})") from None
    finally:
        plt.close(fig)
    return Path(path)


def write_json_report(report: ParityReport, path: str | Path) -> Path:
    """--json FILE: every number of the report."""
    try:
        Path(path).write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise GptExportError(f"{path}: cannot write JSON report ({e.strerror or e})") from None
    return Path(path)
