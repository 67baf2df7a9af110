"""Summaries of timing samples."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

__all__ = ["Summary"]


@dataclass(frozen=True)
class Summary:
    """Median, 90th percentile, mean and minimum of samples, in microseconds.

    >>> s = Summary.of_ns([1000, 2000, 3000, 4000, 100000])
    >>> (s.n, s.median, s.min)
    (5, 3.0, 1.0)
    """

    n: int
    median: float
    p90: float
    mean: float
    min: float
    p10: float = 0.0

    @classmethod
    def of_ns(cls, samples_ns) -> Summary:
        """Summarise samples given in nanoseconds."""
        us = sorted(x / 1000.0 for x in samples_ns)
        if not us:
            raise ValueError("no samples")
        def pct(q: float) -> float:
            return us[min(len(us) - 1, round(q * (len(us) - 1)))]

        return cls(len(us), statistics.median(us), pct(0.9), statistics.fmean(us), us[0], pct(0.1))

    def as_dict(self) -> dict:
        return asdict(self)
