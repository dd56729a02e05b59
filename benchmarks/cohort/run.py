"""Cohort benchmark: scans per minute of `apply` in one process against a LocalCluster of worker processes on this
machine, and how the wall time grows with the number of scans.

    python -m benchmarks.cohort.run [--data-dir ../shared/data] [--sizes 10,20,40] [--crop 10] [--workers 2]

The model is adapted on CHAOS case 2 (2 labelled slices per organ). The cohort is made of distinct crops of the 11
other CHAOS scans (CROP consecutive slices, each crop starting at another slice, so that no two scans share an
embedding-cache entry). Every run starts with an empty embedding cache (the compiled encoder already built, as after
a first run), so each scan is encoded: what an archive run costs. "1 process" is today's `apply_files` (PyTorch on
every core); the cluster is `apply_cohort(workers=N)`: N single-threaded worker processes, PyTorch on cores / N
threads each, its time including the cluster's start (also given apart). Prints JSON and a markdown table, and
writes them to --out/cohort.json and cohort.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from benchmarks.speed.run import with_built_encoders
from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.cohort import apply_cohort
from FewShotSAMLib.models import load_model
from FewShotSAMLib.pipeline import EngineOptions, adapt_files, apply_files
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation

REPO = Path(__file__).resolve().parents[2]
ADAPT_CASE = "2"
ORGANS = [Segment("liver", 1), Segment("right kidney", 2), Segment("left kidney", 3), Segment("spleen", 4)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def chaos_cases(data_dir: Path) -> list[str]:
    images = (data_dir / "chaos_t2_mri").glob("image_*.nii.gz")
    return sorted((path.name[len("image_"):-len(".nii.gz")] for path in images), key=int)


@contextlib.contextmanager
def built_encoder(model):
    """A folder holding the encoder the default ("auto") path uses on this machine, built once (the compiled
    encoder where the CPU has bf16, else the ONNX export), and that path's name."""
    with tempfile.TemporaryDirectory(prefix="fewshotsam-encoders-") as folder:
        size = model.spec.input_size
        model.encode(torch.zeros(1, 3, size, size), "auto", encoders_folder=Path(folder))
        model.release_encoder_sessions()
        yield Path(folder), model.encoder_path("auto", Path(folder))


def crop(image: sitk.Image, first: int, count: int) -> sitk.Image:
    first = min(first, image.GetSize()[2] - count)
    return image[:, :, first:first + count]  # keeps spacing and direction, moves the origin


def make_model(data_dir: Path, folder: Path, crop_slices: int, options: EngineOptions) -> Path:
    chaos = data_dir / "chaos_t2_mri"
    image, labels = (sitk.ReadImage(str(chaos / f"{kind}_{ADAPT_CASE}.nii.gz")) for kind in ("image", "label"))
    liver = np.flatnonzero((sitk.GetArrayFromImage(labels) == 1).any(axis=(1, 2)))
    first = max(0, int(liver.mean()) - crop_slices // 2)
    sitk.WriteImage(crop(image, first, crop_slices), str(folder / "adapt.nii.gz"))
    sitk.WriteImage(crop(labels, first, crop_slices), str(folder / "adapt_labels.nii.gz"))
    volume = read_volume(folder / "adapt.nii.gz")
    painted = few_shot_labels(read_labels(folder / "adapt_labels.nii.gz", volume).array, 0, 2, [1, 2, 3, 4])
    painted_path = write_segmentation(folder / "painted.seg.nrrd", LabelVolume(painted, volume.geometry, ORGANS))
    return adapt_files([(folder / "adapt.nii.gz", painted_path)], folder / "abdomen.fsam", options)


def make_cohort(data_dir: Path, folder: Path, count: int, crop_slices: int) -> list[Path]:
    """`count` distinct crops: case after case, each pass over the cases starting 3 slices further down."""
    cases = [case for case in chaos_cases(data_dir) if case != ADAPT_CASE]
    images = {case: sitk.ReadImage(str(data_dir / "chaos_t2_mri" / f"image_{case}.nii.gz")) for case in cases}
    folder.mkdir()
    scans = []
    for index in range(count):
        case, offset = cases[index % len(cases)], 3 * (index // len(cases))
        path = folder / f"case{case}_from{offset}.nii.gz"
        sitk.WriteImage(crop(images[case], offset, crop_slices), str(path))
        scans.append(path)
    return scans


def timed_run(mode: str, model: Path, scans: list[Path], work: Path, encoders: Path, workers: int) -> dict:
    """One run on an empty embedding cache: wall seconds, scans per minute (and the cluster's start)."""
    cache = tempfile.mkdtemp(prefix="cache-", dir=work)
    with_built_encoders(cache, encoders)
    options = EngineOptions(cache_dir=cache, device="cpu")
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    started = {}
    start = time.perf_counter()
    if mode == "1 process":
        written = apply_files(model, [str(scan) for scan in scans], out, options)
        failed = len(scans) - len(written)
    else:
        summary = apply_cohort(model, [str(scan) for scan in scans], out, options, workers=workers,
                               on_cluster=lambda client: started.setdefault("s", time.perf_counter() - start))
        failed = summary.counts["failed"]
    seconds = time.perf_counter() - start
    row = {"mode": mode, "scans": len(scans), "seconds": round(seconds, 1),
           "scans_per_min": round(60 * len(scans) / seconds, 2), "failed": failed}
    if "s" in started:
        row["cluster_start_s"] = round(started["s"], 1)
        row["scans_per_min_after_start"] = round(60 * len(scans) / (seconds - started["s"]), 2)
    print(json.dumps(row), flush=True)
    return row


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {report['cpu']}, {report['cores']} cores ({report['note']}); encoder: {report['encoder']}; "
             f"scans: CHAOS MRI crops 256x256x{report['crop_slices']}, cold embedding cache.", "",
             "| scans | mode | wall time (s) | scans/min | cluster start (s) | scans/min after start |",
             "|---|---|---|---|---|---|"]
    for row in report["runs"]:
        lines.append(f"| {row['scans']} | {row['mode']} | {row['seconds']} | {row['scans_per_min']} | "
                     f"{row.get('cluster_start_s', '-')} | {row.get('scans_per_min_after_start', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sizes", default="10,20,40", help="numbers of scans, e.g. 10,20,40")
    parser.add_argument("--crop", type=int, default=10, help="slices per scan")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the table")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "crop_slices": args.crop,
              "workers": args.workers, "load_average_at_start": os.getloadavg(),
              "note": args.note or "otherwise idle", "runs": []}
    with tempfile.TemporaryDirectory(prefix="fewshotsam-cohort-") as folder:
        work = Path(folder)
        with built_encoder(load_model("litemedsam", device="cpu")) as (encoders, encoder_path):
            report["encoder"] = encoder_path
            adapt_cache = tempfile.mkdtemp(prefix="cache-", dir=work)
            with_built_encoders(adapt_cache, encoders)
            model = make_model(args.data_dir, work, args.crop, EngineOptions(cache_dir=adapt_cache, device="cpu"))
            scans = make_cohort(args.data_dir, work / "scans", max(sizes), args.crop)
            for size in sizes:
                for mode in ("1 process", f"LocalCluster, {args.workers} workers"):
                    report["runs"].append(timed_run(mode, model, scans[:size], work, encoders, args.workers))
                    save(report, args.out)  # after every run: a stopped benchmark keeps what it measured
    print(json.dumps(report, indent=2))
    print(to_markdown(report))
    return 0


def save(report: dict, out: Path) -> None:
    report["load_average_at_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "cohort.json", json.dumps(report, indent=2))
    write_text_atomically(out / "cohort.md", to_markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
