"""The checkpoint that MONAI's export commands load, as ``inference.json``'s ``ckpt_path``.

``python -m monai.bundle onnx_export / ckpt_export / trt_export --ckpt_file X`` loads the weights of ``X``, but MONAI
keeps ``ckpt_file`` for itself: the config never sees it. ``inference.json`` builds ``network_def`` from the record of
``ckpt_path`` (``scripts.networks.trained_settings``), so without this the network would be that of the repository's
``models/model.pt`` while the weights come from ``X``: the export would be refused (network keys on the command line
contradict that record) or fail to load ``X``. ``ckpt_path`` therefore defaults to the file the export command loads.
"""

from __future__ import annotations

import os

from scripts.bundle_args import bundle_arguments

__all__ = ["EXPORT_COMMANDS", "export_checkpoint"]

# Commands of ``python -m monai.bundle`` that load ``--ckpt_file`` into the config's network.
EXPORT_COMMANDS = ("onnx_export", "ckpt_export", "trt_export")


def export_checkpoint(default: str | os.PathLike, argv: list[str] | None = None) -> str:
    """The checkpoint this process's ``python -m monai.bundle`` export command loads, else ``default``.

    Args:
        default: the config's own checkpoint (``<ckpt_dir>/model.pt``), used by every other command and process.
        argv: a whole command line, program first, as ``sys.argv``. Defaults to ``sys.argv``.

    Returns:
        ``--ckpt_file`` of ``onnx_export``, ``ckpt_export`` or ``trt_export`` (from the command line or
        ``--args_file``); for ``ckpt_export`` without it, MONAI's own default ``models/model.pt`` under the working
        folder (or ``default`` when ``--bundle_root`` is given, since both then name the same file); otherwise
        ``default``.

    Examples::

        "ckpt_path": "$scripts.deploy.export_checkpoint(os.path.join(@ckpt_dir, 'model.pt'))"
    """
    arguments = bundle_arguments(argv)
    if arguments is None or arguments.command not in EXPORT_COMMANDS:
        return str(default)
    ckpt_file = arguments.arguments.get("ckpt_file")
    if ckpt_file:
        return str(ckpt_file)
    if arguments.command == "ckpt_export" and "bundle_root" not in arguments.keys:
        return os.path.join(os.getcwd(), "models", "model.pt")  # MONAI's ckpt_export default without --bundle_root
    return str(default)
