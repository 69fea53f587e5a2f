"""Data-set adapters: each turns a data set's own layout into the project's datalist."""

from .glas import glas_datalist, read_glas_grades

__all__ = ["glas_datalist", "read_glas_grades"]
