"""Cost math (30.5): dollars per million output tokens, and speculative decoding's yield."""

from __future__ import annotations


def cost_per_million(dollars_per_hour: float, tokens_per_s: float) -> float:
    """$ per 1e6 tokens = C_hr / (3600 x R) x 1e6."""
    return dollars_per_hour / (3600.0 * tokens_per_s) * 1e6


def tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens per speculative verification round: (1 - a^(k+1)) / (1 - a)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
