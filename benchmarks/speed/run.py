"""Speed benchmark: encoder throughput per execution path, propagate cold and warm, tuning and prediction time,
peak memory. Every figure of one run is also given as a ratio to the plain eager fp32 encoder measured in the same
run (this machine is noisy: compare ratios, quote medians).

    python -m benchmarks.speed.run [--data-dir ../shared/data] [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from FewShotSAMLib.metrics import dice
from FewShotSAMLib.models import load_model
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.slice_selection import few_shot_labels
from FewShotSAMLib.volume import LabelVolume, Segment
from FewShotSAMLib.volume_io import read_labels, read_volume

REPO = Path(__file__).resolve().parents[2]


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_paths(model, slices: torch.Tensor, repeats: int) -> list[dict]:
    """Slices per second for each way of running the encoder on the same 8 slices."""
    def eager(batch, bf16, channels_last=False):
        def run():
            for start in range(0, len(slices), batch):
                images = slices[start:start + batch]
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                model.encode(images, use_bf16=bf16)
        return run

    paths = [("eager fp32, batch 1 (reference)", eager(1, False)), ("eager fp32, batch 8", eager(8, False)),
             ("bf16 autocast, batch 8", eager(8, True)), ("bf16 autocast, channels-last, batch 8", eager(8, True, True))]
    results = []
    for name, run in paths:
        run()  # warm-up (allocations, oneDNN kernel selection)
        seconds = median_time(run, repeats)
        results.append({"path": name, "slices_per_s": len(slices) / seconds})
    reference = results[0]["slices_per_s"]
    for row in results:
        row["ratio_to_eager_fp32"] = row["slices_per_s"] / reference
    return results


def timed_propagate(engine: Engine, volume, labels) -> tuple[dict, LabelVolume]:
    """Wall time of each stage of one propagate (from the progress events)."""
    last_event = {}  # stage -> time of its last progress event; a stage ends at its last event

    def record(event):
        last_event[event.stage] = time.perf_counter()

    start = time.perf_counter()
    result = engine.propagate(volume, labels, Progress(record))
    total = time.perf_counter() - start
    stages, previous = {}, start
    for stage, end in sorted(last_event.items(), key=lambda item: item[1]):
        stages[f"{stage}_s"] = round(end - previous, 2)
        previous = end
    return {"total_s": round(total, 2), **stages}, result


def scan_case(data_dir: Path, image: str, label: str, values: list[int], k: int = 3):
    volume = read_volume(data_dir / image)
    reference = read_labels(data_dir / label, volume).array
    painted = few_shot_labels(reference, 0, k, values)
    segments = [Segment(f"label {v}", v) for v in values]
    return volume, LabelVolume(painted, volume.geometry, segments), reference


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {"machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "cases": []}

    model = load_model("litemedsam", device="cpu")
    sample = torch.rand(8, 3, 256, 256)
    report["encoder"] = encoder_paths(model, sample, args.repeats)
    reference_rate = report["encoder"][0]["slices_per_s"]

    cases = [("CHAOS MRI 256x256x36", "chaos_t2_mri/image_5.nii.gz", "chaos_t2_mri/label_5.nii.gz", [1, 2, 3, 4])]
    for name, image, label, values in cases:
        volume, labels, reference = scan_case(args.data_dir, image, label, values)
        row = {"case": name, "slices": int(volume.array.shape[0])}
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as cache_dir:
                engine = Engine(EngineOptions(cache_dir=cache_dir, device="cpu", precision=precision), model=model)
                cold, result = timed_propagate(engine, volume, labels)
                warm = [timed_propagate(engine, volume, labels)[0] for _ in range(args.repeats)]
            row[precision] = {
                "cold": cold,
                "warm_median_s": statistics.median(w["total_s"] for w in warm),
                "tune_median_s": statistics.median(w.get("tune_s", 0) for w in warm),
                "propagate_median_s": statistics.median(w.get("propagate_s", 0) for w in warm),
                "mean_dice": float(np.mean([dice(result.array == v, reference == v) for v in values])),
            }
            row[precision]["encode_ratio_vs_eager_fp32_estimate"] = (
                row["slices"] / reference_rate / max(cold.get("encode_s", 1e-9), 1e-9))
        row["dice_change_bf16_vs_fp32"] = row["bf16"]["mean_dice"] - row["fp32"]["mean_dice"]
        report["cases"].append(row)
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    (args.out / "speed.md").write_text(markdown)
    print(markdown)
    return 0


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}. Peak resident memory of the whole run: {report['peak_rss_gib']} GiB.", "",
             "| encoder path (LiteMedSAM, 256x256) | slices/s | ratio to eager fp32 batch 1 |", "|---|---|---|"]
    for row in report["encoder"]:
        lines.append(f"| {row['path']} | {row['slices_per_s']:.2f} | {row['ratio_to_eager_fp32']:.2f}x |")
    lines += ["", "| case | precision | cold propagate (s) | of which encode (s) | warm propagate, median (s) | "
              "tuning, median (s) | prediction, median (s) | mean Dice |", "|---|---|---|---|---|---|---|---|"]
    for row in report["cases"]:
        for precision in ("fp32", "bf16"):
            r = row[precision]
            lines.append(f"| {row['case']} | {precision} | {r['cold']['total_s']} | {r['cold'].get('encode_s', '-')} | "
                         f"{r['warm_median_s']} | {r['tune_median_s']} | {r['propagate_median_s']} | "
                         f"{r['mean_dice']:.3f} |")
        lines.append(f"| | bf16 - fp32 Dice | | | | | | {row['dice_change_bf16_vs_fp32']:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
