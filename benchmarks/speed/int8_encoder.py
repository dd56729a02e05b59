"""Int8 encoder experiment (issue 13): LiteMedSAM's encoder quantised to int8 after training, calibrated on real
slices, timed against eager fp32 and OpenVINO fp32 (and, on a CPU with bf16 instructions, the product's two bf16
paths) in one run, with its embedding difference to fp32.

    python -m benchmarks.speed.int8_encoder [--variants onnxruntime-qdq,onnxruntime-qdq-linear,nncf-mixed,...]
        [--calibration-slices 44] [--rounds 6] [--data-dir ../shared/data] [--out DIR] [--name int8-encoder]

No int8 path is in the product: on an AVX2-only Zen 3 (no VNNI), at load average 3-4, the int8 encoders ran at
0.76-0.93x OpenVINO fp32 (the product's bar: 1.3x; under load 8-11 the linear-layers-only one reached 1.16x),
moving the embeddings by 14-86 % relative (fp32 paths: 3e-6); the most accurate full one (nncf-transformer) lost
0.069 (k=1) and 0.017 (k=3) mean Dice on hippocampus 004 and 019 against OpenVINO fp32 (CHAOS 2 and 15: -0.013
and +0.002). Rerun on a Xeon with VNNI and AMX int8 (benchmarks/results/int8-encoder-xeon.md): int8 ran faster
than OpenVINO fp32 there (NNCF 1.45-1.71x) but slower than OpenVINO bf16 (2.40x) and about as fast as the compiled
bf16 encoder (1.67x), both of which move the embeddings 4x less (0.07-0.08 relative against nncf-transformer's
0.28); still not offered.

Calibration slices come from scans the accuracy check does not score (CHAOS 1, 3, 5 and hippocampus 001, 003),
spread evenly along each scan, so the quantised model is the same on every run; the timed and compared slices come
from the scans it does score (CHAOS 2, 15, hippocampus 004, 019). Variants:
- onnxruntime-qdq: ONNX Runtime quantize_static, QDQ format, Conv/Gemm/MatMul with per-channel int8 weights and
  uint8 activations (reduce_range, against VPMADDUBSW saturation on AVX2), MinMax calibration; run by ONNX Runtime.
  onnxruntime-qdq-linear: the same on the linear layers (Gemm) alone; the convolutions of the first stages are what
  ruin the embeddings (quantising those alone: 80-88 % relative difference).
- nncf-mixed, nncf-transformer: OpenVINO NNCF (PyPI nncf, optional) on the same ONNX export, mixed preset; the
  transformer model type adds SmoothQuant and keeps softmax, LayerNorm and GELU in fp32. Run by OpenVINO.
Timing: rounds of one slice through every path in turn (interleaved, so load swings hit all alike), medians. Prints
JSON and markdown, and writes both to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.accuracy.datasets import load_scan
from benchmarks.speed.run import cpu_numbers, cpu_record, write_results
from FewShotSAMLib.compiled_encoder import cpu_has_bf16, open_compiled_encoder
from FewShotSAMLib.models import load_model
from FewShotSAMLib.onnx_encoder import OnnxEncoder, exported_encoder_path
from FewShotSAMLib.openvino_encoder import OpenVinoEncoder, compiled_openvino_file, openvino_settings
from FewShotSAMLib.orientation import in_plane_spacing, to_slices
from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_SCANS = (("chaos", "1"), ("chaos", "3"), ("chaos", "5"),
                     ("hippocampus", "hippocampus_001"), ("hippocampus", "hippocampus_003"))
EVALUATION_SCANS = (("chaos", "2"), ("chaos", "15"), ("hippocampus", "hippocampus_004"),
                    ("hippocampus", "hippocampus_019"))
VARIANTS = ("onnxruntime-qdq", "onnxruntime-qdq-linear", "nncf-mixed", "nncf-transformer")
ONNXRUNTIME_OPERATORS = {"onnxruntime-qdq": ["Conv", "Gemm", "MatMul"], "onnxruntime-qdq-linear": ["Gemm"]}


def spread_slices(data_dir: Path, scans, per_scan: int, size: int) -> np.ndarray:
    """[n, 3, size, size] model-input images: per_scan slices of each scan, evenly spread, both ends left out."""
    images = []
    for dataset, name in scans:
        scan = load_scan(dataset, name, data_dir)
        stack = to_slices(apply_normalisation(scan.volume.array, choose_normalisation(scan.volume)), scan.axis)
        picked = np.linspace(0, stack.shape[0] - 1, per_scan + 2).round().astype(int)[1:-1]
        resized, _ = resize_stack_longest_side(stack[picked], size, in_plane_spacing(scan.volume.geometry, scan.axis))
        images.append(resized.numpy().astype(np.float32))
    return np.concatenate(images)


def quantise_with_onnxruntime(onnx_path: Path, calibration: np.ndarray, folder: Path, variant: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Slices(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(calibration[index:index + 1] for index in range(len(calibration)))

        def get_next(self):
            image = next(self.remaining, None)
            return None if image is None else {"image": image}

    prepared, quantised = folder / "prepared.onnx", folder / f"{variant}.onnx"
    if not prepared.is_file():
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)  # shapes, Linear as Gemm
    quantize_static(str(prepared), str(quantised), Slices(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=True, op_types_to_quantize=ONNXRUNTIME_OPERATORS[variant])
    return quantised


def quantise_with_nncf(onnx_path: Path, calibration: np.ndarray, folder: Path, transformer: bool) -> Path:
    import nncf
    import openvino

    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantised = nncf.quantize(openvino.Core().read_model(str(onnx_path)),
                              nncf.Dataset([calibration[index:index + 1] for index in range(len(calibration))]),
                              subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, **options)
    path = folder / f"nncf-{'transformer' if transformer else 'mixed'}.xml"
    openvino.save_model(quantised, str(path))
    return path


def openvino_runner(path: Path, threads: int):
    import openvino

    request = openvino.Core().compile_model(str(path), "CPU", openvino_settings(threads)).create_infer_request()
    return lambda image: np.array(request.infer({0: image})[0])


def bf16_runners(model, folder: Path, threads: int) -> dict:
    """The product's bf16 paths on a CPU with bf16 instructions, on normalised [1, 3, S, S] images: the compiled
    encoder and OpenVINO in bf16 (`--encoder compiled`, `--encoder openvino-bf16`; `auto` measures both there)."""
    compiled = open_compiled_encoder(model, folder)
    vino = OpenVinoEncoder(compiled_openvino_file(model, folder, "bf16"), threads, precision="bf16")
    return {"compiled bf16": lambda image: compiled(torch.from_numpy(image)).numpy(),
            "openvino bf16": lambda image: vino(torch.from_numpy(image)).numpy()}


def build_variant(variant: str, onnx_path: Path, calibration: np.ndarray, folder: Path, threads: int):
    """(runner on one [1, 3, S, S] image, seconds to quantise)."""
    start = time.perf_counter()
    if variant in ONNXRUNTIME_OPERATORS:
        session = OnnxEncoder(quantise_with_onnxruntime(onnx_path, calibration, folder, variant), threads).session
        return (lambda image: session.run(None, {"image": image})[0]), time.perf_counter() - start
    path = quantise_with_nncf(onnx_path, calibration, folder, transformer=variant == "nncf-transformer")
    return openvino_runner(path, threads), time.perf_counter() - start


def embedding_difference(runner, images: np.ndarray, reference: np.ndarray) -> dict:
    """Relative L2 difference per slice to the eager fp32 embeddings (mean and max), and the mean cosine."""
    embeddings = np.concatenate([runner(images[index:index + 1]) for index in range(len(images))])
    flat, flat_reference = embeddings.reshape(len(images), -1), reference.reshape(len(images), -1)
    relative = np.linalg.norm(flat - flat_reference, axis=1) / np.linalg.norm(flat_reference, axis=1)
    cosine = (flat * flat_reference).sum(1) / np.linalg.norm(flat, axis=1) / np.linalg.norm(flat_reference, axis=1)
    return {"relative_mean": float(f"{relative.mean():.3g}"), "relative_max": float(f"{relative.max():.3g}"),
            "cosine_mean": round(float(cosine.mean()), 4)}


def interleaved_medians(runners: dict, images: np.ndarray, rounds: int) -> dict[str, float]:
    seconds = {name: [] for name in runners}
    for round_index in range(rounds):
        image = images[round_index % len(images)][None]
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(image)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def measure(args, folder: Path) -> dict:
    threads = torch.get_num_threads()
    model = load_model("litemedsam", device="cpu")
    size = model.spec.input_size
    calibration = spread_slices(args.data_dir, CALIBRATION_SCANS, -(-args.calibration_slices // 5), size)
    images = spread_slices(args.data_dir, EVALUATION_SCANS, 2, size)
    vino = OpenVinoEncoder(compiled_openvino_file(model, folder), threads)

    def eager(image):
        with torch.inference_mode():
            return model.image_encoder(torch.from_numpy(image).contiguous(memory_format=torch.channels_last)).numpy()

    runners = {"eager fp32": eager, "openvino fp32": lambda image: vino(torch.from_numpy(image)).numpy()}
    if cpu_has_bf16():  # int8 must beat what `auto` runs on such a CPU, not just fp32
        runners.update(bf16_runners(model, folder, threads))
    report = {"cpu": cpu_record(), "threads": threads, "calibration_slices": len(calibration),
              "evaluated_slices": len(images), "rounds": args.rounds, "quantise_s": {}, "failed": {}}
    for variant in args.variants:
        try:
            runners[variant], seconds = build_variant(variant, exported_encoder_path(model, folder), calibration,
                                                      folder, threads)
            report["quantise_s"][variant] = round(seconds, 1)
        except ImportError as error:  # nncf is optional: not installed here
            report["failed"][variant] = f"{type(error).__name__}: {error}"
    reference = np.concatenate([eager(images[index:index + 1]) for index in range(len(images))])
    differences = {name: embedding_difference(runner, images, reference) for name, runner in runners.items()}
    report["load_average_before_timing"] = round(os.getloadavg()[0], 1)
    medians = interleaved_medians(runners, images, args.rounds)
    report["load_average_after_timing"] = round(os.getloadavg()[0], 1)
    report["paths"] = [{"path": name, "slices_per_s": round(1 / medians[name], 3),
                        "x_eager_fp32": round(medians["eager fp32"] / medians[name], 2),
                        "x_openvino_fp32": round(medians["openvino fp32"] / medians[name], 2),
                        **differences[name]} for name in runners]
    return report


def to_markdown(report: dict) -> str:
    cpu = report["cpu"]
    lines = [f"CPU: {cpu['model']}{cpu_numbers(cpu)}, instruction sets {', '.join(cpu['instruction_sets'])}; "
             f"{report['threads']} threads; load average {report['load_average_before_timing']} before timing, "
             f"{report['load_average_after_timing']} after.",
             f"Calibration: {report['calibration_slices']} slices of CHAOS 1, 3, 5 and hippocampus 001, 003. "
             f"Timed and compared on {report['evaluated_slices']} slices of CHAOS 2, 15 and hippocampus 004, 019, "
             f"{report['rounds']} interleaved rounds, medians.", "",
             "| encoder path | slices/s | x eager fp32 | x OpenVINO fp32 | embedding difference to fp32, relative "
             "mean / max | cosine | quantise (s) |", "|---|---|---|---|---|---|---|"]
    for row in report["paths"]:
        lines.append(f"| {row['path']} | {row['slices_per_s']} | {row['x_eager_fp32']}x | {row['x_openvino_fp32']}x "
                     f"| {row['relative_mean']:.2g} / {row['relative_max']:.2g} | {row['cosine_mean']} "
                     f"| {report['quantise_s'].get(row['path'], '-')} |")
    lines += [f"| {name} | not run: {why} | - | - | - | - | - |" for name, why in report["failed"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=lambda text: tuple(text.split(",")), default=VARIANTS)
    parser.add_argument("--calibration-slices", type=int, default=44, help="spread over the 5 calibration scans")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None, help="also write --name.json and .md here")
    parser.add_argument("--name", default="int8-encoder")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; use {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="fewshotsam-int8-") as folder:
        report = measure(args, Path(folder))
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, args.name, report, to_markdown(report))
    else:
        print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
