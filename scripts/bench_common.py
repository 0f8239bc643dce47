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

    def stats(self, values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "min": ordered[0],
            "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1],
        }

    def to_json(self) -> dict[str, object]:
        mine, base = self.stats(self.blockctl), self.stats(self.baseline)
        return {
            **asdict(self),
            "blockctl_stats": mine,
            "baseline_stats": base,
            "ratio_median": mine["median"] / base["median"],
            "reps": len(self.blockctl),
        }
