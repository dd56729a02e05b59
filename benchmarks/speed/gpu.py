"""GPU speed benchmark: the two 512x512x300 CTs of the CPU benchmark, cold and warm, on a CUDA GPU, with the
embedded LiteMedSAM (real weights) and SAM ViT-B (randomly initialised weights saved to a file: timing only, its
Dice means nothing). Issue 13's GPU target: a 512x512x300 CT cold <= 5 s.

    python -m benchmarks.speed.gpu [--data-dir ../shared/data] [--models litemedsam,sam_vit_b] [--repeats 3]
        [--cases repeated,long] [--out benchmarks/results] [--name speed-gpu] [--device cuda]

(--device cpu runs the same steps on the CPU: a check of the script itself, minutes per case.)

Per model and CT:
- command line cold: `fewshotsam propagate --device cuda` in its own process with an empty embedding cache (Python
  and PyTorch start-up, CUDA initialisation and the model's load included: what a user waits for);
- in process cold: the same propagate through an Engine whose model is loaded and CUDA warmed up (one slice
  encoded), with an empty embedding cache, split into stages (from the progress events);
- in process warm: embeddings cached, adapted from scratch, median of --repeats;
- the encoder alone: slices per second at batch 8 in bf16 autocast (what `auto` runs on a GPU) and fp32.

CTs: the real 20-slice TotalSegmentator CT repeated 15 times (liver and spleen painted on 3 slices each; every
slice holds them) and TotalSegmentator's 122x101x112 3 mm CT resampled to 512x512x300 (vertebrae L4-L2 painted
on 3 slices each; encoding on demand reaches part of the scan).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.speed.run import (
    LONG_CT_PAINTED,
    REPO,
    mean_dice,
    repeated_ct,
    timed_cli_propagate,
    timed_propagate,
    write_ct_case,
    write_long_ct_case,
    write_results,
)
from FewShotSAMLib.models import load_model, save_random_checkpoint
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.volume_io import read_labels, read_volume

ENCODER_BATCH = 8
ENCODER_SLICES = 64
# Weights that are not bundled are made up here (segment-anything's architecture, seeded random initialisation).
RANDOM_WEIGHTS = {"sam_vit_b"}


def gpu_record() -> dict:
    properties = torch.cuda.get_device_properties(0)
    return {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count, "capability": f"{properties.major}.{properties.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def repeated_case(data_dir: Path, folder: Path) -> dict:
    image, painted, _ = write_ct_case(data_dir, folder)
    scan = repeated_ct(data_dir)
    return {"case": "CT 512x512x300: 20 real slices x 15, liver and spleen", "image": image, "painted": painted,
            "reference": scan.reference, "values": list(scan.structures)}


def long_case(data_dir: Path, folder: Path) -> dict:
    image, reference, painted = write_long_ct_case(data_dir, folder)
    return {"case": "CT 512x512x300: 122x101x112 resampled, vertebrae L4-L2", "image": image, "painted": painted,
            "reference": read_labels(reference, read_volume(image)).array, "values": list(LONG_CT_PAINTED)}


CASES = {"repeated": repeated_case, "long": long_case}


def write_cases(names: list[str], data_dir: Path, folder: Path) -> list[dict]:
    """The CTs as files a user would have (image, painted .seg.nrrd) and each one's reference labels."""
    cases = []
    for name in names:
        (folder / name).mkdir()
        cases.append(CASES[name](data_dir, folder / name))
    return cases


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoder_throughput(model, device: str) -> dict:
    """Slices per second of the encoder alone at batch ENCODER_BATCH, bf16 autocast and fp32."""
    size = model.spec.input_size
    images = torch.rand(ENCODER_BATCH, 3, size, size, device=device) * 255
    batches = ENCODER_SLICES // ENCODER_BATCH if device == "cuda" else 1
    rates = {}
    for precision, autocast in (("bf16", True), ("fp32", False)):
        def run(autocast=autocast):
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                model.image_encoder((images - model.pixel_mean) / model.pixel_std)
        run()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            run()
        synchronize(device)
        rates[f"{precision}_slices_per_s"] = round(batches * ENCODER_BATCH / (time.perf_counter() - start), 2)
    return rates


def run_case(model_name: str, checkpoint: Path | None, model, case: dict, folder: Path, repeats: int,
             device: str) -> dict:
    extra = ("--model", model_name) + (("--checkpoint", str(checkpoint)) if checkpoint else ())
    case_folder = Path(tempfile.mkdtemp(dir=folder))
    cli = timed_cli_propagate(case["image"], case["painted"], case_folder / "cli.seg.nrrd", case_folder / "cache-cli",
                              extra, device=device)
    volume = read_volume(case["image"])
    painted = read_labels(case["painted"], volume)
    options = EngineOptions(cache_dir=str(case_folder / "cache"), device=device, warm_start=False)
    engine = Engine(options, model=model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cold, result = timed_propagate(engine, volume, painted)
    warm = [timed_propagate(engine, volume, painted)[0] for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"case": case["case"], "command_line_cold_s": cli["total_s"], "in_process_cold": cold,
            "in_process_warm_median_s": statistics.median(w["total_s"] for w in warm),
            "peak_gpu_memory_gib": round(peak, 2),
            "mean_dice": round(mean_dice(result.array, case["reference"], case["values"]), 4)}


def run_model(model_name: str, cases: list[dict], folder: Path, repeats: int, device: str) -> dict:
    checkpoint = (save_random_checkpoint(model_name, folder / f"{model_name}-random.pth")
                  if model_name in RANDOM_WEIGHTS else None)
    model = load_model(model_name, checkpoint, device=device)
    size = model.spec.input_size
    model.encode(torch.zeros(1, 3, size, size), "auto")  # CUDA start-up, kernel selection
    return {"model": model_name, "weights": "random (timing only)" if checkpoint else "real",
            "input_size": size, "encoder": encoder_throughput(model, device),
            "cases": [run_case(model_name, checkpoint, model, case, folder, repeats, device) for case in cases]}


def to_markdown(report: dict) -> str:
    gpu = report["gpu"]
    lines = [f"Command: `{report['command']}`", "",
             f"GPU: {gpu['name']} ({gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs), torch {gpu['torch']}, "
             f"CUDA {gpu['cuda']}; host {report['host_cpus']} CPUs. Cold = empty embedding cache; the command line "
             "row includes Python and PyTorch start-up, CUDA initialisation and the model's load; in process = "
             "model loaded and CUDA warmed up. Warm = embeddings cached, adapted from scratch, median of "
             f"{report['repeats']}.", "",
             "| model (weights) | case | command line cold (s) | in process cold (s) | encode + reach (s) | rest "
             "(s) | in process warm (s) | peak GPU memory (GiB) | mean Dice |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["models"]:
        for case in row["cases"]:
            cold = case["in_process_cold"]
            encode = sum(cold.get(f"{stage}_s", 0) for stage in ("encode", "reach"))
            lines.append(f"| {row['model']} ({row['weights']}) | {case['case']} | {case['command_line_cold_s']} | "
                         f"{cold['total_s']} | {encode:.2f} | {cold['total_s'] - encode:.2f} | "
                         f"{case['in_process_warm_median_s']} | {case['peak_gpu_memory_gib']} | {case['mean_dice']} |")
    lines += ["", "| model | input | encoder bf16 autocast (slices/s) | encoder fp32 (slices/s) |", "|---|---|---|---|"]
    for row in report["models"]:
        lines.append(f"| {row['model']} | {row['input_size']}x{row['input_size']} | "
                     f"{row['encoder']['bf16_slices_per_s']} | {row['encoder']['fp32_slices_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--models", type=lambda text: text.split(","), default=["litemedsam", "sam_vit_b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=lambda text: text.split(","), default=list(CASES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--name", default="speed-gpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU (--device cpu checks the script on the CPU)")
    torch.manual_seed(0)
    np.random.seed(0)
    gpu = gpu_record() if args.device == "cuda" else {"name": "none (--device cpu)", "memory_gib": 0,
                                                       "multiprocessors": 0, "torch": torch.__version__, "cuda": None}
    command = "python -m benchmarks.speed.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "gpu": gpu, "host_cpus": torch.get_num_threads(), "repeats": args.repeats,
              "models": []}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cases = write_cases(args.cases, args.data_dir, folder)
        for name in args.models:
            report["models"].append(run_model(name, cases, folder, args.repeats, args.device))
            print(json.dumps(report["models"][-1]), flush=True)
    write_results(args.out, args.name, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
