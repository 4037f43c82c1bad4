"""Training: optimizer, precision (loss scaling), state, the pure train step, the loop."""
