"""Python code of the MPAMatch pathology segmentation bundle, imported by the configs as ``scripts``."""

from .errors import ConfigError
from .paths import REPO

# The folder that holds scripts/ and models/: the repository root, or dist/<bundle_name>/ in a packed bundle.
BUNDLE_ROOT = str(REPO)

from . import bundle_args, data, deploy, engines, handlers, inference, losses, metrics, networks, prototypes, wsi  # noqa: E402

__all__ = ["BUNDLE_ROOT", "ConfigError", "bundle_args", "data", "deploy", "engines", "handlers", "inference", "losses", "metrics", "networks", "prototypes", "wsi"]
