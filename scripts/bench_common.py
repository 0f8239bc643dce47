"""What every benchmark row is: blockctl's figures next to a baseline measured in the same run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class Row:
    operation: str
    unit: str
    blockctl: list[float]
    baseline: list[float]
    baseline_name: str
    #: The goal the ratio is held to ("<= 2x", ">= 1x", or a note), and whether it was met.
    goal: str = ""
    met: bool | None = None

    def stats(self, values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "min": ordered[0],
            "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1],
        }

    def ratio(self) -> float:
        """blockctl's median over the baseline's."""
        return statistics.median(self.blockctl) / statistics.median(self.baseline)

    def to_json(self) -> dict[str, object]:
        mine, base = self.stats(self.blockctl), self.stats(self.baseline)
        return {
            **asdict(self),
            "blockctl_stats": mine,
            "baseline_stats": base,
            "ratio_median": self.ratio(),
            "reps": len(self.blockctl),
        }
