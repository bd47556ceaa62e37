"""``hybridcls bench memory``: does peak memory stay flat as the number of images grows?

A prediction run must stream: memory may hold the model, one batch and one
small record per input, nothing that grows with the images' pixels or the
rows written. The benchmark writes N small JPEG files once (the largest N;
smaller runs use the first N through a list file), then runs
``python -m hybridcls predict`` on them in a fresh child process per N and
reads the child's peak resident set size from the kernel
(``os.wait4`` -> ``ru_maxrss``, so nothing has to sample it). A warm-up run
on one image fills the text-classifier cache first, so every measured run
does the same work apart from the number of images. Offline: the shipped
tiny CLIP by default (with its own caption templates: the default 80 do not
all fit its 12-token context), or a calibrated run (``checkpoint``).

Example:
    >>> report = run_memory("bench-memory", sizes=(2000, 20000))  # doctest: +SKIP
    >>> report.ratio  # doctest: +SKIP
    1.01
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybridcls.bench.speed import write_jpegs
from hybridcls.cache import atomic_write_json, atomic_write_text

__all__ = ["MemoryReport", "MemoryRun", "measure_predict", "run_memory"]

_PROMPTS = ["red fox", "grey wolf", "brown bear", "white owl", "black cat", "green frog",
            "blue jay", "yellow finch", "orange tiger", "striped zebra"]


@dataclass
class MemoryRun:
    """One ``predict`` child process: how many images, its peak RSS, rows written, seconds."""

    images: int
    peak_rss_mib: float
    rows: int
    seconds: float
    exit_status: int


@dataclass
class MemoryReport:
    """Every run, the largest / smallest peak ratio, and where it ran."""

    runs: list[MemoryRun]
    ratio: float
    info: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| images | peak RSS (MiB) | rows | seconds |", "|---:|---:|---:|---:|"]
        lines += [f"| {r.images} | {r.peak_rss_mib:.1f} | {r.rows} | {r.seconds:.1f} |" for r in self.runs]
        lines.append(f"\npeak ratio, {self.runs[-1].images} vs {self.runs[0].images} images: "
                     f"{self.ratio:.3f}")
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, asdict(self))


def measure_predict(argv: Sequence[str], *, cwd: str | os.PathLike[str] | None = None
                    ) -> tuple[float, int, float]:
    """Run ``python -m hybridcls ARGV`` in a child; ``(peak RSS in MiB, exit status, seconds)``.

    The peak is the child's own ``ru_maxrss`` (``os.wait4``), so other
    children of this process do not blur it. Linux reports KiB, macOS bytes.
    """
    env = dict(os.environ)
    # The child imports the same hybridcls as this process, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "hybridcls", *argv], cwd=cwd, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode not in (0, 1):
        raise RuntimeError(f"hybridcls {' '.join(argv[:1])} exited {child.returncode}: "
                           f"{stderr.decode(errors='replace')[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024
    return usage.ru_maxrss * scale / 2**20, child.returncode, seconds


def run_memory(
    out: str | os.PathLike[str],
    sizes: Sequence[int] = (2000, 20000),
    *,
    image_size: int = 64,
    batch_size: int = 64,
    workers: int = 0,
    clip_model: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | Sequence[str] | None = None,
    warmup: bool = True,
) -> MemoryReport:
    """Predict ``sizes`` images in fresh processes and compare their peak memory.

    Args:
        out: Working folder: ``images/``, list files, predictions, ``memory.json``.
        sizes: Numbers of images, smallest first; the ratio is last / first.
        image_size: Side of the generated JPEG files, in pixels.
        batch_size: ``--batch-size`` of the runs.
        workers: ``--workers`` of the runs (0: decoding happens in the measured process).
        clip_model: ``--clip-model`` (default: the shipped tiny CLIP, offline, with the
            synthetic world's caption templates; another model gets the default templates).
        checkpoint: A calibrated run directory, to measure the full hybrid.
        prompts: Prompts file, or a list of class names (written to ``out/prompts.txt``)
            (default: 10 generated class names; needed with ``checkpoint``: it must name
            the run's classes).
        warmup: Run once on one image first so the text cache exists.

    Returns:
        The report (also written to ``out/memory.json``).
    """
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.synth.world import CAPTION_TEMPLATES

    out = Path(out)
    sizes = sorted(int(n) for n in sizes)
    images = out / "images"
    have = len(list(images.glob("*.jpg"))) if images.is_dir() else 0
    if have < sizes[-1]:
        write_jpegs(images, sizes[-1], size=(image_size, image_size))
    paths = sorted(images.glob("*.jpg"))[: sizes[-1]]
    if prompts is None or not isinstance(prompts, (str, os.PathLike)):
        names = _PROMPTS if prompts is None else list(prompts)
        prompts = out / "prompts.txt"
        atomic_write_text(prompts, "\n".join(names) + "\n")
    common = ["--prompts", str(prompts), "--clip-model", clip_model or TINY_CLIP_MODEL_ID,
              "--cache-dir", str(out / "cache"), "--batch-size", str(batch_size),
              "--workers", str(workers), "--device", "cpu", "-q"]
    if clip_model is None:
        templates = out / "templates.txt"
        atomic_write_text(templates, "".join(f"{t}\n" for t in CAPTION_TEMPLATES))
        common += ["--templates", str(templates)]
    if checkpoint is not None:
        common += ["--checkpoint", str(checkpoint)]

    def list_file(n: int) -> Path:
        f = out / f"list_{n}.txt"
        atomic_write_text(f, "".join(f"{p.resolve()}\n" for p in paths[:n]))
        return f

    if warmup:
        measure_predict(["predict", str(list_file(1)), *common, "-o", str(out / "warmup.csv")])
    runs = []
    for n in sizes:
        pred = out / f"pred_{n}.csv"
        peak, status, seconds = measure_predict(["predict", str(list_file(n)), *common, "-o", str(pred)])
        with open(pred, encoding="utf-8") as fh:
            rows = sum(1 for _ in fh) - 1  # plain names: one line per row
        runs.append(MemoryRun(n, round(peak, 1), rows, round(seconds, 1), status))
    info = {
        "command": "hybridcls bench memory " + " ".join(
            ["--sizes", *map(str, sizes), "--image-size", str(image_size), "--batch-size", str(batch_size),
             "--workers", str(workers)]
            + (["--checkpoint", str(checkpoint), "--prompts", str(prompts)] if checkpoint else [])),
        "model": "hybrid" if checkpoint else "zero-shot",
        "clip_model": clip_model or "tiny (shipped)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    report = MemoryReport(runs, round(runs[-1].peak_rss_mib / runs[0].peak_rss_mib, 4), info)
    report.to_json(out / "memory.json")
    return report
