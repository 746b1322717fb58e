"""Accuracies with confidence intervals."""
from __future__ import annotations

import math

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (95 % by default); (nan, nan) for n = 0.

    center = (p + z^2 / 2n) / (1 + z^2 / n), half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    (Wilson 1927); unlike the normal approximation it stays inside [0, 1] and is sensible at p = 0 or 1.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n = {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def accuracy(correct) -> dict:
    """{"accuracy", "ci95": [low, high], "n"} of a boolean array of per-example outcomes."""
    correct = np.asarray(correct, dtype=bool)
    n, k = int(correct.size), int(correct.sum())
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else math.nan, "ci95": [low, high], "n": n}
