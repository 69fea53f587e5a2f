"""The adapter registry: every data set the product can turn into a datalist, in one table.

``python -m scripts.cli prepare <name>`` offers every entry of :data:`ADAPTERS`, and the label-efficiency study
(``--data``) offers every entry's ``study`` names. Both split a data set the same way: the adapter's ``listing``
lists its images with their groups, and its ``split`` (one seeded, stratified split of a listing,
``common.split_listing``) makes the sections. Adding a data set means one adapter module (its ``*_listing``,
``*_split`` and ``*_datalist`` functions) and one line here.
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
        datalist: writes the datalist, ``datalist(root, out, labeled_ratio=..., seed=..., ...) -> Path``: its
            ``split`` of its ``listing`` of ``root``; its keyword arguments are the ``prepare`` command's options.
        listing: ``(root, **fixed) -> Listing``: the data set's images, annotated ones with their ``group``.
        split: ``(listing, out, labeled_ratio=..., seed=..., ...) -> Split``: the sections of ``datalist`` for a
            listing; the study calls it on a listing whose test section is the study's test set.
        study: the study's ``--data`` names for this adapter, each with the ``listing`` arguments the study fixes
            (EBHI's preset). Empty: the study does not offer it.
    """

    datalist: Callable
    listing: Callable | None = None
    split: Callable | None = None
    study: dict[str, dict] = field(default_factory=dict)


ADAPTERS: dict[str, Adapter] = {
    "glas": Adapter(glas.glas_datalist, glas.glas_listing, glas.glas_split, {"glas": {}}),
    "ebhi": Adapter(ebhi.ebhi_datalist, ebhi.ebhi_listing, ebhi.ebhi_split,
                    {name: {"preset": name} for name in ebhi.EBHI_PRESETS}),
    "kpi": Adapter(kpi.kpi_datalist, kpi.kpi_listing, kpi.kpi_split, {"kpi": {}}),
    "folder": Adapter(folder.folder_datalist, folder.folder_listing, folder.folder_split, {"folder": {}}),
    "csv": Adapter(folder.csv_datalist, folder.csv_listing, folder.folder_split),
}


def study_adapters() -> dict[str, tuple[Adapter, dict]]:
    """The study's ``--data`` names: ``{name: (adapter, the listing arguments the study fixes)}``."""
    return {name: (adapter, fixed) for adapter in ADAPTERS.values() for name, fixed in adapter.study.items()}
