"""Capacity planning: the chips table, memory and roofline estimates, cost."""
