"""The adapter registry: every data set the product can turn into a datalist, in one table.

``python -m scripts.cli prepare <name>`` offers every entry of :data:`ADAPTERS`, and the label-efficiency study
(``--data``) offers every entry's ``study`` names. Adding a data set means one adapter module (its ``*_datalist``
function, and ``study_scan`` / ``study_layout`` when the study should use it) and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import ebhi, folder, glas, kpi

__all__ = ["Adapter", "ADAPTERS", "study_adapters"]


@dataclass(frozen=True)
class Adapter:
    """One data set's adapter, as the ``prepare`` command and the study use it.

    Args:
        datalist: writes the datalist, ``datalist(root, out, labeled_ratio=..., seed=..., ...) -> Path``; its
            keyword arguments are the ``prepare`` command's options.
        study: the study's ``--data`` names for this adapter, each with the arguments the study fixes (EBHI's
            preset, no test split of the adapter's own). Empty: the study does not offer it.
        study_scan: ``(root, test_root, scratch, **fixed) -> StudyData``: the annotated training images, each with
            a ``group`` that stratifies the test images the study holds out, the unlabeled images, and the test
            set of ``test_root``.
        study_layout: ``(view, pool, unlabeled, test, source, root)``: lays the images the study keeps out as
            symbolic links in the data set's own layout, for ``datalist`` to split.
        test_through_adapter: the study tests on the test entries ``datalist`` writes from the layout (KPI
            converts its patches) rather than on the scanned files.
    """

    datalist: Callable
    study: dict[str, dict] = field(default_factory=dict)
    study_scan: Callable | None = None
    study_layout: Callable | None = None
    test_through_adapter: bool = False


ADAPTERS: dict[str, Adapter] = {
    "glas": Adapter(glas.glas_datalist, {"glas": {}}, glas.study_scan, glas.study_layout),
    "ebhi": Adapter(ebhi.ebhi_datalist, {name: {"preset": name, "test_ratio": 0.0} for name in ebhi.EBHI_PRESETS},
                    ebhi.study_scan, ebhi.study_layout),
    "kpi": Adapter(kpi.kpi_datalist, {"kpi": {}}, kpi.study_scan, kpi.study_layout, test_through_adapter=True),
    "folder": Adapter(folder.folder_datalist, {"folder": {"test_ratio": 0.0}}, folder.study_scan, folder.study_layout),
    "csv": Adapter(folder.csv_datalist),
}


def study_adapters() -> dict[str, tuple[Adapter, dict]]:
    """The study's ``--data`` names: ``{name: (adapter, the arguments the study fixes)}``."""
    return {name: (adapter, fixed) for adapter in ADAPTERS.values() for name, fixed in adapter.study.items()}
