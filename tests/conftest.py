"""Shared test settings: offline hubs, a private cache for generated data, and tiny network settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# Tiny encoders keep every network test on CPU within seconds.
TINY_ENCODER = {"depth": 2}
TINY_DECODER = {"skip_channels": (32, 16, 8), "decoder_head_channels": 32, "decoder_channels": (16, 16, 8, 8), "embed_dim": 16}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small generated demo data set shared by the bundle tests: returns its datalist path."""
    from scripts.data import ensure_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    return ensure_demo_dataset(root, seed=0, n_labeled=4, n_unlabeled=4, n_validation=2, n_test=2, image_size=(96, 128))
