"""Measures: each takes a model (and data) and returns a plain dataclass of figures."""
