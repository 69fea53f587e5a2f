"""Data-set adapters: each lists a data set's own layout (its images with their groups) and splits the listing
into the project's datalist; ``registry.py`` lists them for the ``prepare`` command and the study."""

from .common import Listing, Split, split_listing
from .ebhi import EBHI_CLASSES, EBHI_PRESETS, ebhi_datalist
from .folder import csv_datalist, folder_datalist
from .glas import glas_datalist, read_glas_grades
from .kpi import kpi_datalist
from .registry import ADAPTERS, Adapter, study_adapters

__all__ = ["EBHI_CLASSES", "EBHI_PRESETS", "ebhi_datalist", "csv_datalist", "folder_datalist", "glas_datalist",
           "read_glas_grades", "kpi_datalist", "Listing", "Split", "split_listing", "ADAPTERS", "Adapter",
           "study_adapters"]
