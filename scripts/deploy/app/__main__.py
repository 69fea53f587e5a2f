"""``python -m scripts.deploy.app -i tiles/ -o masks/ -m model.onnx``; also the entry point of the packaged MAP.

Absolute imports only: inside a MAP this file runs as ``/opt/holoscan/app/__main__.py`` next to ``scripts/``.
"""

from monai.utils import optional_import

from scripts.errors import ConfigError, install_excepthook

if __name__ == "__main__":
    install_excepthook()
    _, has_sdk = optional_import("monai.deploy.core")
    if not has_sdk:
        raise ConfigError(
            "The MONAI Deploy App SDK is not installed; install it in a separate environment with "
            "pip install -r requirements.txt -r scripts/deploy/app/requirements.txt (Linux with glibc 2.35+), or "
            "get the same masks without it: python -m monai.bundle run inference --config_file "
            "bundle/configs/inference.json --backend onnx --onnx_path <model.onnx> --input_dir <folder>."
        )
    from scripts.deploy.app.application import main

    main()
