"""Interoperability with other ecosystems' checkpoint formats."""
