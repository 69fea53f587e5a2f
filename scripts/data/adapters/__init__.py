"""Data-set adapters: each turns a data set's own layout into the project's datalist; ``registry.py`` lists them
for the ``prepare`` command and the study."""

from .ebhi import EBHI_CLASSES, EBHI_PRESETS, ebhi_datalist
from .folder import csv_datalist, folder_datalist
from .glas import glas_datalist, read_glas_grades
from .kpi import kpi_datalist
from .registry import ADAPTERS, Adapter, study_adapters

__all__ = ["EBHI_CLASSES", "EBHI_PRESETS", "ebhi_datalist", "csv_datalist", "folder_datalist", "glas_datalist",
           "read_glas_grades", "kpi_datalist", "ADAPTERS", "Adapter", "study_adapters"]
