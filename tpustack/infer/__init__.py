"""Inference: sampling (the full cache-aware decode loop arrives with its own issue)."""
