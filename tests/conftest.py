"""Shared test settings and fixtures: offline hubs and the generated demo data set (helpers.py holds the shared
functions and constants)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small generated demo data set shared by the bundle tests: returns its datalist path."""
    from scripts.data import ensure_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    return ensure_demo_dataset(root, seed=0, n_labeled=4, n_unlabeled=4, n_validation=2, n_test=2, image_size=(96, 128))
