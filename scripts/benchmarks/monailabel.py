"""Time and memory per request of the MONAI Label app (scripts/monailabel) on a real server.

    python -m scripts.benchmarks.monailabel --model models/model.pt [--studies DIR] [--region 2048] [--repeats 3]

Starts the server over ``--studies`` (default: a folder of generated demo tiles plus the generated demo slide),
then times ``/infer/gland`` on every tile, ``/infer/wsi_v2/gland`` on a ``--region`` square of the slide (ASAP
output), ``/scoring/entropy`` over the unlabeled tiles and ``/activelearning/entropy``. Memory is the resident set
of the server process and its children, sampled every 0.1 s; the table gives the peak during each request type.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import fire

__all__ = ["main"]


class _PeakMemory:
    """Samples the resident memory of a process tree in a thread; ``take()`` returns and resets the peak (MB)."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        import psutil

        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.1)

    def take(self) -> float:
        peak, self.peak = self.peak, self._rss()
        return peak / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _demo_studies(folder: Path, tiles: int) -> Path:
    from scripts.data import ensure_demo_dataset
    from scripts.wsi.synthetic import demo_slide

    datalist = ensure_demo_dataset(folder / "demo")
    entries = json.loads(datalist.read_text())["unlabeled"][:tiles]
    studies = folder / "studies"
    studies.mkdir(parents=True)
    for index, entry in enumerate(entries):
        shutil.copyfile(datalist.parent / entry["image"], studies / f"tile{index:03d}.png")
    shutil.copyfile(demo_slide(folder / "slide"), studies / "slide.tif")
    return studies


def main(model: str = "models/model.pt", studies: str | None = None, region: int = 2048, repeats: int = 3,
         tiles: int = 16) -> list[dict]:
    """Prints a Markdown table of seconds and peak server memory per request type; returns its rows."""
    import requests

    from scripts.monailabel.server import running_server

    model_path = Path(model).resolve()
    if not model_path.is_file():
        raise SystemExit(f"--model {model}: no such file; train first (docs/monailabel.md).")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = Path(studies) if studies else _demo_studies(scratch, tiles)
        started = time.perf_counter()
        with running_server(folder, {"model_path": str(model_path)}, scratch / "server.log") as server:
            url = server["url"]
            startup = time.perf_counter() - started
            memory = _PeakMemory(server["pid"])
            rows.append({"request": "server start (until /info answers)", "count": 1, "seconds": startup,
                         "peak_mb": memory.take()})
            tile_ids = [p.stem for p in sorted(folder.glob("*.png"))][:tiles]
            slide_ids = [p.stem for p in sorted(folder.glob("*.tif")) if p.stem not in tile_ids][:1]
            times = []
            for tile in tile_ids:
                start = time.perf_counter()
                response = requests.post(f"{url}/infer/gland", params={"image": tile, "output": "image"}, timeout=600)
                response.raise_for_status()
                times.append(time.perf_counter() - start)
            rows.append({"request": "/infer/gland (one tile, PNG mask)", "count": len(times),
                         "seconds": statistics.median(times), "peak_mb": memory.take()})
            if slide_ids:
                wsi = {"location": [0, 0], "size": [region, region], "level": 0}
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    response = requests.post(f"{url}/infer/wsi_v2/gland", params={"image": slide_ids[0], "output": "asap"},
                                             data={"wsi": json.dumps(wsi)}, timeout=1800)
                    response.raise_for_status()
                    times.append(time.perf_counter() - start)
                rows.append({"request": f"/infer/wsi_v2/gland ({region} x {region} slide region, ASAP)",
                             "count": len(times), "seconds": statistics.median(times), "peak_mb": memory.take()})
            start = time.perf_counter()
            response = requests.post(f"{url}/scoring/entropy", params={"run_sync": True}, timeout=3600)
            response.raise_for_status()
            scored = max(1, len(tile_ids))
            rows.append({"request": f"/scoring/entropy (flip TTA, per tile of {len(tile_ids)})", "count": scored,
                         "seconds": (time.perf_counter() - start) / scored, "peak_mb": memory.take()})
            start = time.perf_counter()
            requests.post(f"{url}/activelearning/entropy", timeout=600).raise_for_status()
            rows.append({"request": "/activelearning/entropy (scores cached)", "count": 1,
                         "seconds": time.perf_counter() - start, "peak_mb": memory.take()})
            memory.stop()
    print("| request | n | s / request | peak server RSS (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['request']} | {row['count']} | {row['seconds']:.2f} | {row['peak_mb']:.0f} |")
    return rows


if __name__ == "__main__":
    fire.Fire(main)
