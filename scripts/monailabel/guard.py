"""What the MONAI Label app accepts from a client: every request value is data, checked before anything is done.

The server is reached by every annotator's QuPath on a lab network, and MONAI Label's authentication is off by
default, so each value a client sends is treated as hostile (docs/security.md):

- names (image ids, label tags) match one safe pattern (``SAFE_NAME``: no path separator, no leading dot) and
  every path built from them stays inside the studies folder;
- ``image=`` in a request names a datastore image or the file this request uploaded (uploads land in a private
  folder of the server process, ``use_private_upload_dir``), never a path of the server;
- training requests carry only the keys of ``TRAIN_KEYS``, each of its type and range (``checked_train_request``),
  so no client string ever reaches a config file, where MONAI would evaluate ``$`` expressions;
- work per request is bounded: image size checked from the file header before decoding (``check_pixels``), request
  bodies (``RequestGuard``), label XML size and polygon count (``scripts.monailabel.annotations``);
- routes this app does not offer (model upload / delete, sessions, batch inference that writes labels, the DICOMweb
  proxy) are refused before MONAI Label handles them.

A refusal is ``RequestRefused``: an HTTP status and a reason that names the key or value at fault.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fastapi import HTTPException

__all__ = ["SAFE_NAME", "RequestRefused", "check_name", "checked_train_request", "check_pixels", "check_info",
           "as_request_bool", "as_int", "as_number", "use_private_upload_dir", "upload_dir", "is_upload", "discard_upload", "inside",
           "RequestGuard", "install_request_guard", "finite_number", "short_text", "sweep_uploads", "TRAIN_KEYS",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_UPLOAD_MB"]

logger = logging.getLogger(__name__)

# A word character first (letters of any script, digits, underscore), then those, spaces and . , + ( ) - ; no
# separator, no leading dot, at most 200 characters. Stock slide names (TCGA-..., "case 12 (HE).svs") fit.
SAFE_NAME = re.compile(r"\w[\w .,+()-]{0,199}")
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # --conf max_image_pixels
DEFAULT_MAX_UPLOAD_MB = 2048  # --conf max_upload_mb: a request body larger than this is refused
MAX_INFO_BYTES = 16_384  # an image's or label's info, as JSON
MAX_JSON_BODY = 65_536  # the JSON body of a training or scoring request


class RequestRefused(HTTPException):
    """A client request that is refused: ``status_code`` and a ``detail`` naming the key or value at fault."""


# ----------------------------------------------------------------------------------------------------- names
def check_name(value: Any, key: str) -> str:
    """``value`` as a datastore name (image id or label tag) of the ``SAFE_NAME`` pattern, else a 422 naming ``key``."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise RequestRefused(422, f"'{key}' {shown!r} is not a valid name: use letters, digits, spaces and . , + ( ) "
                                  "- _ (no path separator, not starting with a dot, at most 200 characters).")
    return value


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path``, with every link resolved, lies inside ``folder``."""
    resolved, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return resolved == root or root in resolved.parents


# ----------------------------------------------------------------------------------------------- uploads
_UPLOAD_DIR: Path | None = None


def use_private_upload_dir() -> Path:
    """Makes this process's temporary files (MONAI Label writes every upload there) land in a folder of its own.

    The folder is created once per process with owner-only permissions and removed at exit; a request may then name
    an uploaded file only if it lies in that folder (``is_upload``).
    """
    global _UPLOAD_DIR
    if _UPLOAD_DIR is None or not _UPLOAD_DIR.is_dir():
        _UPLOAD_DIR = Path(tempfile.mkdtemp(prefix="mpamatch-monailabel-uploads-"))
        tempfile.tempdir = str(_UPLOAD_DIR)
        atexit.register(shutil.rmtree, _UPLOAD_DIR, True)
        logger.info("Uploads are handled in the private folder %s", _UPLOAD_DIR)
    return _UPLOAD_DIR


def upload_dir() -> Path | None:
    return _UPLOAD_DIR


def is_upload(path: Any) -> bool:
    """Whether ``path`` is a plain file that an upload to this process wrote (not a link, not elsewhere)."""
    if _UPLOAD_DIR is None or not isinstance(path, str) or not path:
        return False
    candidate = Path(path)
    return candidate.parent == _UPLOAD_DIR and candidate.is_file() and not candidate.is_symlink()


def discard_upload(path: Any) -> None:
    """Removes an uploaded temporary file once it has been handled, whatever the outcome."""
    if is_upload(path):
        Path(path).unlink(missing_ok=True)


def sweep_uploads(max_age_s: float = 300.0) -> int:
    """Removes uploads older than ``max_age_s`` that a refused request left behind; returns how many.

    The app removes each upload once its request is handled (``discard_upload``). A request whose parameters
    replaced ``image`` after uploading a file no longer names its upload, and MONAI Label drops the removal it had
    scheduled when a request is refused: such files are removed here, at the next request after five minutes.
    """
    if _UPLOAD_DIR is None or not _UPLOAD_DIR.is_dir():
        return 0
    removed, now = 0, time.time()
    for entry in _UPLOAD_DIR.iterdir():
        try:
            if now - entry.lstat().st_mtime > max_age_s:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed += 1
        except OSError:
            pass
    return removed


# ------------------------------------------------------------------------------------------------ values
def as_request_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RequestRefused(422, f"'{key}' is {value!r}; use true or false.")


def as_int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        number = None
    else:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise RequestRefused(422, f"'{key}' is {value!r}; use a whole number from {low} to {high}.")
    return int(number)


def as_number(value: Any, key: str, low: float, high: float) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or not low <= number <= high:
        raise RequestRefused(422, f"'{key}' is {value!r}; use a number from {low} to {high}.")
    return number


def _method(value: Any, key: str) -> str:
    from scripts.engines.presets import METHOD_PRESETS

    if not isinstance(value, str) or value not in METHOD_PRESETS:
        shown = value if not isinstance(value, str) or len(value) <= 80 else f"{value[:80]}..."
        raise RequestRefused(422, f"'{key}' is {shown!r}; use one of {sorted(METHOD_PRESETS)}.")
    return value


def _gpus(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"all|\d{1,3}(,\d{1,3}){0,63}", value):
        raise RequestRefused(422, f"'{key}' is {value!r}; use 'all' or GPU numbers such as '0' or '0,1'.")
    return value


# What a training request may hold, each with its check ('gpus' is MONAI Label's: the task process's visible GPUs). 'model' is the path's model name; 'bundle_path' is added by
# MONAI Label itself for bundle apps.
TRAIN_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "model": lambda v, k: check_name(v, k),
    "method": _method,
    "seed": lambda v, k: as_int(v, k, 0, 2**31 - 1),
    "labeled_batch_size": lambda v, k: as_int(v, k, 0, 256),
    "num_iterations": lambda v, k: as_int(v, k, 0, 10_000_000),
    "num_epochs": lambda v, k: as_int(v, k, 0, 100_000),
    "finetune": as_request_bool,
    "validation_fraction": lambda v, k: as_number(v, k, 0.0, 0.9),
    "gpus": _gpus,
}
_MONAILABEL_TRAIN_KEYS = {"bundle_path"}


def checked_train_request(request: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """The options of a training request (the keys of ``TRAIN_KEYS``), each checked for its type and range (422).

    Args:
        request: the request's options.
        strict: refuse unknown keys too, with the keys this app reads, so a misspelt option is not silently ignored
            (the server's check of a client's request). The task process reads the request after MONAI Label has
            added keys of its own (``local_rank``, ...) and passes False. Defaults to True.
    """
    unknown = sorted(set(request) - set(TRAIN_KEYS) - _MONAILABEL_TRAIN_KEYS)
    if unknown and strict:
        raise RequestRefused(422, f"Unknown training option(s) {unknown}; this app reads {sorted(TRAIN_KEYS)}.")
    checked = {key: TRAIN_KEYS[key](value, key) for key, value in request.items()
               if key in TRAIN_KEYS and value is not None}
    return checked


def check_info(info: Any, checks: Mapping[str, Callable[[Any, str], Any]], reserved: tuple[str, ...]) -> dict:
    """An image's or label's info from a client: a JSON object of at most ``MAX_INFO_BYTES``, the keys of ``checks``
    of their type (e.g. an entropy score must be a number), none of the server-managed ``reserved`` keys."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise RequestRefused(422, f"Info must be a JSON object, got {type(info).__name__}.")
    try:
        size = len(json.dumps(info))
    except (TypeError, ValueError) as err:
        raise RequestRefused(422, f"Info is not plain JSON ({err}).") from err
    if size > MAX_INFO_BYTES:
        raise RequestRefused(413, f"Info is {size} bytes as JSON; at most {MAX_INFO_BYTES} are stored.")
    taken = sorted(set(info) & set(reserved))
    if taken:
        raise RequestRefused(422, f"Info key(s) {taken} are kept by the server and cannot be set by a client.")
    for key, check in checks.items():
        if key in info:
            check(info[key], key)
    return info


def short_text(value: Any, key: str) -> str:
    if not isinstance(value, str) or len(value) > 200:
        raise RequestRefused(422, f"'{key}' must be a text of at most 200 characters.")
    return value


def finite_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestRefused(422, f"'{key}' is {value!r}; it must be a finite number.")
    return float(value)


# ------------------------------------------------------------------------------------------------ images
def check_pixels(path: str | os.PathLike, limit: int, what: str = "Image") -> tuple[int, int] | None:
    """(height, width) of an image read from its header, refused (413) above ``limit`` pixels before any decoding.

    Returns None for a file that is not an image Pillow can open (the reader that comes next reports it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:  # Pillow's own cap (Image.MAX_IMAGE_PIXELS) met while opening
        width = height = None
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found.group(1)} pixels" if found else "larger than Pillow's limit"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if width is None or width * height > limit:
        size = size if width is None else f"{width} x {height} pixels"
        raise RequestRefused(413, f"{what} is {size}; this server takes at most {limit} pixels per image "
                                  "(--conf max_image_pixels raises it). Send a smaller tile or a region of the slide "
                                  "(/infer/wsi_v2/gland with location and size).")
    return height, width


# -------------------------------------------------------------------------------------------- the routes
def _training_running() -> bool:
    from monailabel.utils.async_tasks.utils import processes

    return bool(processes("train"))


class RequestGuard:
    """ASGI middleware in front of MONAI Label's routes: request bodies and the routes this app does not offer.

    - a body larger than ``max_body_bytes`` is refused (413) from its ``Content-Length``, and cut off when a
      chunked body grows past it;
    - ``PUT`` / ``DELETE /model/*``, ``/session/*``, ``POST /batch/infer/*`` and ``/proxy/*`` are refused;
    - ``POST /train/*``: the JSON body goes through ``checked_train_request``; ``run_sync`` and ``enqueue`` are
      refused (training runs in the background, one at a time) and a second training while one runs gets 409.
    - ``POST /scoring/*``: the body may only hold ``force``.

    Args:
        app: the ASGI application (MONAI Label's FastAPI app, its middleware stack).
        max_body_bytes: the largest request body. Defaults to ``DEFAULT_MAX_UPLOAD_MB`` MiB.
        prefix: MONAI Label's API prefix (``settings.MONAI_LABEL_API_STR``). Defaults to ``""``.
    """

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20, prefix: str = ""):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sweep_uploads()
        method, path = scope["method"].upper(), scope["path"]
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix):]
        try:
            self._check_route(method, path)
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                raise RequestRefused(413, f"Request body of {length.decode(errors='replace')} bytes refused; this "
                                          f"server takes at most {self.max_body_bytes // 2**20} MiB "
                                          "(--conf max_upload_mb raises it).")
            if method == "POST" and (path.startswith("/train") or path.startswith("/scoring")):
                body = await self._read_body(receive)
                self._check_task_request(path, scope.get("query_string", b""), body)
                receive = self._replay(body)
        except RequestRefused as err:
            logger.warning("Refused %s %s: %s", method, scope["path"], err.detail)
            return await self._answer(scope, send, err)
        return await self.app(scope, self._limited(receive), send)

    @staticmethod
    def _check_route(method: str, path: str) -> None:
        if path.startswith("/model/") and method in ("PUT", "DELETE"):
            raise RequestRefused(403, "Models are published by training (POST /train/gland) or copied onto the "
                                      "server by its administrator; uploading or deleting them here is turned off.")
        if path.startswith("/session"):
            raise RequestRefused(404, "Sessions are not used by this app: send the image with the request or add it "
                                      "to the datastore (PUT /datastore/image).")
        if path.startswith("/batch/infer") and method == "POST":
            raise RequestRefused(403, "Batch inference would store the model's masks as labels; request suggestions "
                                      "per image (/infer/gland) or segment folders with the bundle's inference.json.")
        if path.startswith("/proxy"):
            raise RequestRefused(404, "This app keeps its images in a local datastore; there is no DICOMweb proxy.")

    def _check_task_request(self, path: str, query: bytes, body: bytes) -> None:
        from urllib.parse import parse_qs

        options = {k: v[-1] for k, v in parse_qs(query.decode("latin-1")).items()}
        try:
            params = json.loads(body) if body.strip() else {}
        except ValueError as err:
            raise RequestRefused(422, f"The request body must be a JSON object of options ({err}).") from err
        if not isinstance(params, dict):
            raise RequestRefused(422, "The request body must be a JSON object of options.")
        if path.startswith("/scoring"):
            unknown = sorted(set(params) - {"force"})
            if unknown:
                raise RequestRefused(422, f"Unknown scoring option(s) {unknown}; this app reads ['force'].")
            if "force" in params:
                as_request_bool(params["force"], "force")
            return
        for key in ("run_sync", "enqueue"):
            if key in options and as_request_bool(options[key], key):
                raise RequestRefused(422, f"'{key}' is not offered: training runs in the background, one at a time; "
                                          "poll GET /train/ for its progress.")
        model = path[len("/train"):].strip("/")
        # POST /train/ carries one options object per model; POST /train/<model> carries the options themselves.
        requests_ = params.values() if not model else [params]
        for request in requests_:
            if not isinstance(request, dict):
                raise RequestRefused(422, "Training options must be a JSON object.")
            checked_train_request(request)
        if _training_running():
            raise RequestRefused(409, "A training is already running; wait for it to finish (GET /train/ shows its "
                                      "progress) or stop it (DELETE /train/).")

    @staticmethod
    async def _read_body(receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_JSON_BODY:
                raise RequestRefused(413, f"The options of a training or scoring request are at most {MAX_JSON_BODY} "
                                          "bytes of JSON.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes):
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return receive

    def _limited(self, receive):
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    logger.warning("Request body cut off past %d bytes", self.max_body_bytes)
                    return {"type": "http.disconnect"}
            return message

        return limited

    @staticmethod
    async def _answer(scope, send, err: RequestRefused) -> None:
        from starlette.responses import JSONResponse

        async def no_body():
            return {"type": "http.disconnect"}

        await JSONResponse({"detail": err.detail}, status_code=err.status_code)(scope, no_body, send)


def install_request_guard(fastapi_app, max_body_bytes: int, prefix: str = "") -> bool:
    """Puts ``RequestGuard`` in front of a started FastAPI app's middleware stack (once); False if it cannot."""
    stack = getattr(fastapi_app, "middleware_stack", None)
    if stack is None:
        return False
    if isinstance(stack, RequestGuard):
        stack.max_body_bytes = int(max_body_bytes)
        return True
    fastapi_app.middleware_stack = RequestGuard(stack, max_body_bytes, prefix)
    return True
