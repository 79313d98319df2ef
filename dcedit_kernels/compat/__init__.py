"""Importers for checkpoints of other editing code bases (`mend`: Mitchell et al.'s MEND)."""

from . import mend

__all__ = ["mend"]
