"""Speed benchmark: encoder throughput per execution path, propagate cold and warm, tuning and prediction time,
peak memory. Every figure of one run is also given as a ratio to the plain eager fp32 encoder measured in the same
run (this machine is noisy: compare ratios, quote medians).

    python -m benchmarks.speed.run [--data-dir ../shared/data] [--repeats 3] [--jit] [--out benchmarks/results]
        [--name speed] [--encoders-only] [--encoder-slices 8]

The encoder table covers every path (eager, ONNX Runtime, OpenVINO, AOTInductor fp32 and bf16; a path that cannot
be built here is listed with the reason), this CPU's model, instruction sets and fp32 roofline, the encoder's FLOPs
counted by PyTorch, and what `--encoder auto`'s probe picks here.

Cases: a CHAOS MRI (256x256x36) propagated with each encoder path (cold = empty embedding cache, warm = cache hit
but adapted from scratch, one more slice = the same painting plus one slice after a run, warm-started from it; all
three also as fractions of the time eager fp32 takes just to encode that scan),
and a 512x512x300 CT (the real 20-slice TotalSegmentator CT repeated 15 times along z) written to files and run
through the command line, cold then warm, each in its own process whose peak resident memory is the figure for the
4 GB target (the CT row gives whole-process times; its stage columns are empty).

--long-ct: a CT whose structures cover part of the scan (real anatomy on an upsampled grid: TotalSegmentator's
122x101x112 3 mm CT resampled to 512x512x300, vertebrae L4-L2 painted on 3 slices each), cold through the command
line with encoding on demand (the default) and with --encode-all-slices: time, slices encoded, Dice of both.

--cli-rerun: the CHAOS case's re-runs through the command line, each in a new process as the Slicer module runs
them (one more painted slice, warm-started; and the painting before it again, a full run on cached embeddings),
beside the same re-runs in this process and the bare cost of a new process (Python, torch, the engine's imports
and the model loaded): what a Slicer user waits for against what the engine itself takes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.accuracy.datasets import load_scan
from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.encoder_probe import PROBE_ROUNDS
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.metrics import dice
from FewShotSAMLib.models import BUILT_PATHS, load_model
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.slice_selection import few_shot_labels, one_more_slice
from FewShotSAMLib.volume import LabelVolume, Segment

REPO = Path(__file__).resolve().parents[2]
ENCODER_PATHS = ("compiled", "openvino-bf16", "openvino", "onnx", "fp32", "bf16")  # fast CPU paths first (--case-paths)
CT_REPEATS = 15  # 20 real slices x 15 = 300
LONG_CT_SHAPE = (512, 512, 300)  # x, y, z of the resampled TotalSegmentator CT (--long-ct)
LONG_CT_PAINTED = {28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2"}  # TotalSegmentator v1 label ids
# The encoder of the command-line cases (--long-ct, --cli-rerun) unless --cli-encoder names another: what `auto`
# picks on the Zen 3 (speed-zen3.md), named so that no probe is timed.
CLI_ENCODER = "openvino"


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Built CPU paths, in the order the table lists them; eager PyTorch rows come first.
BUILT_ENCODER_ROWS = (
    ("ONNX Runtime fp32, all graph optimisations", "onnx"),
    ("OpenVINO fp32", "openvino"),
    ("OpenVINO bf16 (CPUs with bf16 instructions)", "openvino-bf16"),
    ("compiled: AOTInductor fp32, frozen weights", "compiled-fp32"),
    ("compiled: AOTInductor bf16, frozen weights", "compiled"),
)


def encoder_paths(model, slices: torch.Tensor, repeats: int, encoders: Path, with_jit: bool,
                  build: dict, eager_variants: bool = True) -> list[dict]:
    """Slices per second for each way of running the encoder on the same real slices, one path after another
    (the ratios are to eager fp32 batch 1 of the same run). The built encoders are already in `encoders` (build
    gives their build times, or why they cannot be built here): "first call" is loading and warming up."""
    def batched(batch, path):
        def run():
            for start in range(0, len(slices), batch):
                model.encode(slices[start:start + batch], path, encoders_folder=encoders)
        return run

    paths = [("eager fp32, batch 1 (reference)", "fp32", batched(1, "fp32"))]
    if eager_variants:
        paths += [("eager fp32, batch 8", "fp32", batched(8, "fp32")),
                  ("bf16 autocast, batch 8", "bf16", batched(8, "bf16"))]
    paths += [(name, path, batched(8, path)) for name, path in BUILT_ENCODER_ROWS if path in build["built_s"]]
    if with_jit:
        paths.append(("torch.compile bf16 (JIT, no freezing), batch 8", None, jit_compiled_encoder(model, slices)))
    reference = model.encode(slices, "fp32")
    results = []
    for name, path, run in paths:
        start = time.perf_counter()
        run()  # warm-up: allocations, kernel selection, loading the built encoder, or compiling (JIT)
        first_call = time.perf_counter() - start
        seconds = median_time(run, repeats)
        row = {"path": name, "encoder": path, "slices_per_s": len(slices) / seconds,
               "first_call_s": round(first_call, 1)}
        if path is not None:
            embeddings = model.encode(slices, path, encoders_folder=encoders)
            row["embedding_rel_diff_vs_fp32"] = float((embeddings - reference).norm() / reference.norm())
        results.append(row)
        model.release_encoder_sessions()
    results += [{"path": name, "encoder": path, "cannot_run_here": build["failed"][path]}
                for name, path in BUILT_ENCODER_ROWS if path in build["failed"]]
    for row in results:
        if "slices_per_s" in row:
            row["ratio_to_eager_fp32"] = row["slices_per_s"] / results[0]["slices_per_s"]
    return results


CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
                "amx_bf16", "amx_int8", "asimd", "sve")  # the instruction sets the encoder paths care about
FP32_FLOPS_PER_CYCLE_AVX2 = 32  # per core: 2 FMA units x 8 fp32 lanes x 2 operations (multiply and add)


def cpu_record() -> dict:
    """The CPU's model, the instruction sets that matter for the encoder paths, cores and the clock used for the
    roofline (/proc/cpuinfo's current "cpu MHz", or $FEWSHOTSAM_CPU_GHZ when set: a virtual machine may report
    its nominal clock, not the boost clock it runs at)."""
    from FewShotSAMLib.encoder_probe import cpu_description

    model_name, _, flags = cpu_description().partition(" | ")
    megahertz = []
    with contextlib.suppress(OSError):
        megahertz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("cpu MHz")]
    clock, source = (statistics.median(megahertz) / 1000, "/proc/cpuinfo cpu MHz") if megahertz else (None, None)
    if os.environ.get("FEWSHOTSAM_CPU_GHZ"):
        clock, source = float(os.environ["FEWSHOTSAM_CPU_GHZ"]), "FEWSHOTSAM_CPU_GHZ"
    present = set(flags.split())
    return {"model": model_name.strip(), **cpu_family_and_model(),
            "instruction_sets": [name for name in CPU_FEATURES if name in present],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "clock_ghz": None if clock is None else round(clock, 2), "clock_source": source,
            "load_average_1min": round(os.getloadavg()[0], 1)}


def cpu_family_and_model() -> dict:
    """/proc/cpuinfo's vendor, family and model numbers: the model name alone ("AMD EPYC") does not tell a Zen 3
    from a Zen 4 (both AMD family 25, told apart by the model: 1 is a Zen 3, 17 a Zen 4) or a Zen 5 (family 26)."""
    from FewShotSAMLib.encoder_probe import cpuinfo_fields

    fields = cpuinfo_fields() or {}
    wanted = {"vendor_id": "vendor", "cpu family": "family", "model": "model_number"}
    return {name: fields[key] for key, name in wanted.items() if key in fields}


def encoder_gflop_per_slice(model) -> float:
    """The encoder's floating-point operations on one slice, counted by PyTorch (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.spec.input_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.image_encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def roofline(cpu: dict, gflop_per_slice: float, rows: list[dict]) -> dict:
    """The CPU's fp32 peak (AVX2 FMA: 32 FLOP per cycle per core) at the recorded clock, and each measured path's
    achieved GFLOP/s as a fraction of it."""
    if "fma" not in cpu["instruction_sets"] or not cpu["clock_ghz"]:
        return {"gflop_per_slice": round(gflop_per_slice, 2), "note": "no FMA or no clock: no roofline"}
    threads = min(cpu["cores"], cpu["torch_threads"])
    peak = FP32_FLOPS_PER_CYCLE_AVX2 * cpu["clock_ghz"] * threads
    for row in rows:
        if "slices_per_s" in row:
            row["gflop_per_s"] = round(row["slices_per_s"] * gflop_per_slice, 1)
            row["fraction_of_fp32_roofline"] = round(row["gflop_per_s"] / peak, 3)
    return {"gflop_per_slice": round(gflop_per_slice, 2), "fp32_peak_gflop_per_s": round(peak, 1),
            "roofline_slices_per_s": round(peak / gflop_per_slice, 2),
            "formula": f"{FP32_FLOPS_PER_CYCLE_AVX2} FLOP/cycle/core x {cpu['clock_ghz']} GHz x {threads} cores"}


def probed_auto(model, encoders: Path) -> dict:
    """What `auto` measures and picks here, and what the probe costs once the encoders are built."""
    from FewShotSAMLib.encoder_probe import probe_record_file

    probe_record_file(model, encoders).unlink(missing_ok=True)  # measure now, not an earlier run's ranking
    start = time.perf_counter()
    chosen = model.encoder_path("auto", encoders)
    seconds = time.perf_counter() - start
    model.release_encoder_sessions()
    record = json.loads(probe_record_file(model, encoders).read_text()) if chosen in BUILT_PATHS else {}
    return {"chosen": chosen, "probe_s": round(seconds, 1), "seconds_per_slice": record.get("seconds_per_slice"),
            "failed": record.get("failed")}


def jit_compiled_encoder(model, slices: torch.Tensor):
    """torch.compile (inductor, just in time) of the encoder under bf16 autocast: measured for comparison; it
    compiles again in every new process."""
    encoder = torch.compile(model.image_encoder)
    images = ((slices - model.pixel_mean) / model.pixel_std).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            encoder(images)
    return run


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


def painted_case(scan, k: int = 3):
    values = list(scan.structures)
    painted = few_shot_labels(scan.reference, scan.axis, k, values)
    segments = [Segment(name, value) for value, name in scan.structures.items()]
    return LabelVolume(painted, scan.volume.geometry, segments), values


@contextlib.contextmanager
def built_encoders(model, paths: tuple[str, ...] = BUILT_PATHS, keep_in: Path | None = None):
    """A folder holding this machine's built encoders (compiled, OpenVINO, ONNX), the seconds each took to build
    (one-off costs of a first run, including the encoding of one slice; near 0 for one already in keep_in) and why
    any cannot be built here. keep_in: a folder to build them in and keep (default: a temporary one)."""
    with (contextlib.nullcontext(keep_in) if keep_in else tempfile.TemporaryDirectory(prefix="fewshotsam-")) as folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        build = {"built_s": {}, "failed": {}}
        for path in paths:
            start = time.perf_counter()
            size = model.spec.input_size
            try:
                model.encode(torch.zeros(1, 3, size, size), path, encoders_folder=Path(folder))
                build["built_s"][path] = round(time.perf_counter() - start, 1)
            except FewShotSAMError as error:  # e.g. no bf16 instructions for the compiled bf16 encoder
                build["failed"][path] = str(error)
        model.release_encoder_sessions()
        yield Path(folder), build


def with_built_encoders(cache_dir: str | Path, encoders: Path) -> None:
    """Make an empty embedding cache hold this machine's built encoders, as after a first run: "cold" means no
    cached embeddings, not a fresh install (the encoder table gives the one-off build time)."""
    shutil.copytree(encoders, Path(cache_dir) / ".encoders", ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)


def propagate_case(model, scan, encoder: str, repeats: int, encoders: Path, scan_encode_s: float) -> dict:
    """Cold (empty embedding cache), warm (embeddings cached, adapted from scratch) and one more painted slice after
    a run (warm start from that run's record), each also as a fraction of `scan_encode_s`, the time eager fp32
    takes just to encode the same scan (measured in the same run: the issue's targets are these fractions)."""
    labels, values = painted_case(scan)
    more = LabelVolume(one_more_slice(labels.array, scan.reference, scan.axis)[0], labels.geometry, labels.segments)
    with tempfile.TemporaryDirectory() as cache_dir:
        with_built_encoders(cache_dir, encoders)
        options = EngineOptions(cache_dir=cache_dir, device="cpu", encoder=encoder)
        engine = Engine(options, model=model)
        from_scratch = Engine(dataclasses.replace(options, warm_start=False), model=model)
        cold, result = timed_propagate(engine, scan.volume, labels)
        warm = [timed_propagate(from_scratch, scan.volume, labels)[0] for _ in range(repeats)]
        one_more, warm_dice = [], []
        for _ in range(repeats):
            timed_propagate(from_scratch, scan.volume, labels)  # the run before the new slice (records it)
            timing, warm_result = timed_propagate(engine, scan.volume, more)
            one_more.append(timing["total_s"])
            warm_dice.append(mean_dice(warm_result.array, scan.reference, values))
        scratch_dice = mean_dice(timed_propagate(from_scratch, scan.volume, more)[1].array, scan.reference, values)
    row = {
        "encoder": encoder,
        "cold": cold,
        "warm_median_s": statistics.median(w["total_s"] for w in warm),
        "prompts_median_s": statistics.median(w.get("prompts_s", 0) for w in warm),
        "tune_median_s": statistics.median(w.get("tune_s", 0) for w in warm),
        "predict_median_s": statistics.median(w.get("propagate_s", 0) for w in warm),
        "one_more_slice_median_s": statistics.median(one_more),
        "mean_dice": mean_dice(result.array, scan.reference, values),
        "one_more_slice_dice": {"warm_start": statistics.median(warm_dice), "from_scratch": scratch_dice},
    }
    row["fraction_of_eager_fp32_encode"] = {
        name: round(seconds / scan_encode_s, 3) for name, seconds in
        (("cold", cold["total_s"]), ("warm", row["warm_median_s"]), ("one_more_slice", row["one_more_slice_median_s"]))}
    return row


def write_results(out: Path, name: str, report: dict, markdown: str) -> None:
    """A benchmark's results as out/<name>.json and .md (each written atomically), and the markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / f"{name}.json", json.dumps(report, indent=2))
    write_text_atomically(out / f"{name}.md", markdown)
    print(markdown)


def mean_dice(result: np.ndarray, reference: np.ndarray, values: list[int]) -> float:
    return float(np.mean([dice(result == v, reference == v) for v in values]))


def eager_scan_encode_seconds(model, scan) -> float:
    """Seconds eager fp32, one slice at a time, takes to encode every slice of `scan`: the yardstick of the
    propagate targets (cold <= 0.35x, warm <= 0.08x, one more slice <= 0.06x of it)."""
    from FewShotSAMLib.orientation import to_slices
    from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side

    stack = to_slices(apply_normalisation(scan.volume.array, choose_normalisation(scan.volume)), scan.axis)
    images, _ = resize_stack_longest_side(stack, model.spec.input_size, (1.0, 1.0))
    model.encode(images[:1], "fp32")  # warm-up: allocations and kernel selection
    start = time.perf_counter()
    for index in range(images.shape[0]):
        model.encode(images[index:index + 1], "fp32")
    return time.perf_counter() - start


def repeated_ct(data_dir: Path):
    """The real 512x512x20 CT and its labels repeated along the slice axis to 300 slices (same spacing)."""
    scan = load_scan("totalseg", "ct_dicom_20slices", data_dir)
    reps = [1, 1, 1]
    reps[scan.axis] = CT_REPEATS
    array = np.tile(scan.volume.array, reps)
    geometry = dataclasses.replace(scan.volume.geometry, shape=array.shape)
    volume = dataclasses.replace(scan.volume, array=array, geometry=geometry)
    return dataclasses.replace(scan, volume=volume, reference=np.tile(scan.reference, reps))


def write_ct_case(data_dir: Path, folder: Path) -> tuple[Path, Path, tuple[int, ...]]:
    """The 512x512x300 CT and its painted slices (3 per organ) as files, as a user would have them."""
    import SimpleITK as sitk

    from FewShotSAMLib.volume_io import write_segmentation

    scan = repeated_ct(data_dir)
    labels, _ = painted_case(scan)
    image = sitk.GetImageFromArray(scan.volume.array)
    geometry = scan.volume.geometry
    image.SetSpacing([float(x) for x in geometry.spacing])
    image.SetOrigin([float(x) for x in geometry.origin])
    image.SetDirection([float(x) for x in np.asarray(geometry.direction).ravel()])
    sitk.WriteImage(image, str(folder / "ct300.nrrd"))
    write_segmentation(folder / "painted.seg.nrrd", labels)
    return folder / "ct300.nrrd", folder / "painted.seg.nrrd", scan.volume.array.shape


def cli_propagate_command(image: Path, labels: Path, out: Path, cache_dir: Path, extra: tuple[str, ...] = (),
                          device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "FewShotSAMLib", "propagate", str(image), "--labels", str(labels),
            "--out", str(out), "--cache-dir", str(cache_dir), "--device", device, "--progress", "none", *extra]


def timed_cli_propagate(image: Path, labels: Path, out: Path, cache_dir: Path, extra: tuple[str, ...] = (),
                        device: str = "cpu") -> dict:
    """`fewshotsam propagate` in its own process: wall time and that process's peak resident memory."""
    command = cli_propagate_command(image, labels, out, cache_dir, extra, device)
    start = time.perf_counter()
    # Through a small intermediate process: Linux carries a parent's peak RSS into a forked child's ru_maxrss,
    # so measured straight from this (large) process the child's peak would read as at least ours.
    done = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit code {done.returncode}): {done.stderr[-2000:]}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    return {"total_s": round(time.perf_counter() - start, 2), "peak_rss_gib": round(peak_kib / 2**20, 2)}


MEASURE_CHILD = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def run_ct_case(data_dir: Path, encoders: Path) -> dict:
    """Cold (empty cache) and warm runs of the command line on the 512x512x300 CT, and the result's Dice."""
    from FewShotSAMLib.volume_io import read_labels, read_volume

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image, labels, shape = write_ct_case(data_dir, folder)
        with_built_encoders(folder / "cache", encoders)
        cold = timed_cli_propagate(image, labels, folder / "cold.seg.nrrd", folder / "cache")
        warm = timed_cli_propagate(image, labels, folder / "warm.seg.nrrd", folder / "cache")
        scan = repeated_ct(data_dir)
        result = read_labels(folder / "warm.seg.nrrd", read_volume(image)).array
    values = list(scan.structures)
    return {"encoder": "auto (command line)", "shape": list(shape), "cold": cold, "warm_median_s": warm["total_s"],
            "peak_rss_gib": max(cold["peak_rss_gib"], warm["peak_rss_gib"]),
            "mean_dice": mean_dice(result, scan.reference, values)}


def write_long_ct_case(data_dir: Path, folder: Path) -> tuple[Path, Path, Path]:
    """The TotalSegmentator CT (122x101x112, 3 mm) and its vertebrae labels resampled to LONG_CT_SHAPE (linear and
    nearest neighbour, same physical extent, origin and direction), and LONG_CT_PAINTED painted on 3 slices each."""
    import SimpleITK as sitk

    from FewShotSAMLib.orientation import slice_axis
    from FewShotSAMLib.volume_io import read_labels, read_volume, write_segmentation

    source = data_dir / "totalsegmentator_ct_mr"
    image = sitk.ReadImage(str(source / "ct_example_full.nii.gz"))
    labels = sitk.ReadImage(str(source / "ct_example_full_seg_vertebrae_only.nii.gz"))
    spacing = [size * step / new for size, step, new in zip(image.GetSize(), image.GetSpacing(), LONG_CT_SHAPE)]
    # Resampled on voxel corners, so that both grids cover the same physical extent.
    origin = image.TransformContinuousIndexToPhysicalPoint([-0.5 + step / old / 2 for step, old in
                                                            zip(spacing, image.GetSpacing())])

    def resampled(picture, interpolator, pixel_type):
        return sitk.Resample(picture, list(LONG_CT_SHAPE), sitk.Transform(), interpolator, origin, spacing,
                             image.GetDirection(), 0, pixel_type)

    paths = folder / "ct_long.nrrd", folder / "reference.nrrd", folder / "painted.seg.nrrd"
    sitk.WriteImage(resampled(image, sitk.sitkLinear, sitk.sitkInt16), str(paths[0]))
    sitk.WriteImage(resampled(labels, sitk.sitkNearestNeighbor, sitk.sitkUInt8), str(paths[1]))
    volume = read_volume(paths[0])
    reference = read_labels(paths[1], volume).array
    reference = np.where(np.isin(reference, list(LONG_CT_PAINTED)), reference, 0)
    painted = few_shot_labels(reference, slice_axis(volume.geometry, "auto"), 3, list(LONG_CT_PAINTED))
    segments = [Segment(name, value) for value, name in LONG_CT_PAINTED.items()]
    write_segmentation(paths[2], LabelVolume(painted, volume.geometry, segments))
    return paths


def run_long_ct_case(data_dir: Path, encoders: Path, encoder: str = CLI_ENCODER) -> dict:
    """Cold runs of the command line on the long CT, encoding on demand and every slice, each with an empty
    embedding cache (the built encoder kept): time, peak memory, slices encoded, Dice against the (resampled,
    model-made) reference, and how many voxels the two results differ in."""
    from FewShotSAMLib.embedding_cache import EmbeddingCache
    from FewShotSAMLib.orientation import slice_axis
    from FewShotSAMLib.volume_io import read_labels, read_volume

    row = {"case": f"TotalSegmentator CT {'x'.join(map(str, LONG_CT_SHAPE))} resampled from 122x101x112 at 3 mm "
                   f"(real anatomy, upsampled grid), {', '.join(LONG_CT_PAINTED.values())} painted on 3 slices each",
           "encoder": encoder, "load_average_start": os.getloadavg()[0], "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image, reference_path, painted = write_long_ct_case(data_dir, folder)
        volume = read_volume(image)
        reference = read_labels(reference_path, volume).array
        painted_array = read_labels(painted, volume).array
        axis = slice_axis(volume.geometry, "auto")
        extent = np.flatnonzero(np.isin(reference, list(LONG_CT_PAINTED)).any(
            axis=tuple(a for a in range(3) if a != axis)))
        row["slices"] = int(volume.array.shape[axis])
        row["painted_slices"] = int(np.count_nonzero(painted_array.any(
            axis=tuple(a for a in range(3) if a != axis))))
        row["structures_span_slices"] = [int(extent[0]), int(extent[-1])]
        results = {}
        for name, extra in (("on_demand", ()), ("encode_all_slices", ("--encode-all-slices",))):
            cache = folder / f"cache-{name}"
            with_built_encoders(cache, encoders)
            out = folder / f"{name}.seg.nrrd"
            run = timed_cli_propagate(image, painted, out, cache, ("--encoder", encoder, *extra))
            (entry,) = EmbeddingCache(cache).entries()
            results[name] = read_labels(out, volume).array
            row["runs"][name] = {**run, "slices_encoded": entry.n_done,
                                 "mean_dice": round(mean_dice(results[name], reference, list(LONG_CT_PAINTED)), 4)}
        row["voxels_differing"] = int(np.count_nonzero(results["on_demand"] != results["encode_all_slices"]))
    row["load_average_end"] = os.getloadavg()[0]
    return row


def long_ct_markdown(row: dict) -> str:
    lines = [f"Long CT: {row['case']}; {row['slices']} slices, the painted vertebrae span slices "
             f"{row['structures_span_slices'][0]}-{row['structures_span_slices'][1]}, {row['painted_slices']} "
             f"painted; encoder {row['encoder']}; cold = empty embedding cache, encoder built; one command-line "
             f"process each; load average {row['load_average_start']:.1f} at the start, "
             f"{row['load_average_end']:.1f} at the end.", "",
             "| encoding | cold propagate (s) | slices encoded | mean Dice | peak memory (GiB) |",
             "|---|---|---|---|---|"]
    for name, label in (("on_demand", "on demand (default)"), ("encode_all_slices", "--encode-all-slices")):
        run = row["runs"][name]
        lines.append(f"| {label} | {run['total_s']} | {run['slices_encoded']} | {run['mean_dice']:.4f} | "
                     f"{run['peak_rss_gib']} |")
    lines += ["", f"Voxels that differ between the two results: {row['voxels_differing']}."]
    return "\n".join(lines) + "\n"


STARTUP_COMMAND = ("from FewShotSAMLib.models import load_model; from FewShotSAMLib.pipeline import Engine; "
                   "load_model('litemedsam', device='cpu')")
# How long the Slicer module's standby engine process is given to finish its imports before it gets its job: less
# than a user takes to paint one more slice (its imports take about 5 s on the 2-core Zen 3).
STANDBY_SETTLE_S = 15


def slicer_worker():
    """The Slicer module's worker handling (FewShotSAMSlicerLib/worker.py imports neither slicer nor qt)."""
    if str(REPO / "FewShotSAM") not in sys.path:
        sys.path.insert(0, str(REPO / "FewShotSAM"))
    from FewShotSAMSlicerLib import worker

    return worker


def timed_standby_propagate(standbys, command: list[str]) -> float:
    """One propagate as the Slicer module runs it: in the engine process its StandbyProcessFactory started ahead."""
    worker = slicer_worker()
    env = worker.workerEnvironment(None, str(REPO))
    standbys.prepare(sys.executable, env)
    time.sleep(STANDBY_SETTLE_S)
    start = time.perf_counter()
    run = worker.WorkerRun(standbys(command, env)).start()
    if run.wait() != worker.SUCCEEDED or not run.process.startedAhead:
        raise RuntimeError(f"{' '.join(command)} through a standby process: {run.status}, {run.errorMessage}")
    return round(time.perf_counter() - start, 2)


def run_cli_rerun_case(data_dir: Path, encoders: Path, repeats: int, encoder_path: str = CLI_ENCODER) -> dict:
    """CHAOS 5 (3 painted slices per organ, encoder `encoder_path`): one more painted slice and a full run on cached
    embeddings, through the command line (a new process each), through the Slicer module's standby process and in
    this process; medians of `repeats`."""
    from FewShotSAMLib.volume_io import write_segmentation

    scan = load_scan("chaos", "5", data_dir)
    labels, _ = painted_case(scan)
    more = LabelVolume(one_more_slice(labels.array, scan.reference, scan.axis)[0], labels.geometry, labels.segments)
    image = data_dir / "chaos_t2_mri" / "image_5.nii.gz"
    encoder = ("--encoder", encoder_path)
    row = {"case": "CHAOS MRI 256x256x36 (scan 5), 3 painted slices per organ, then one more",
           "encoder": encoder_path, "load_average_start": os.getloadavg()[0]}
    startup = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP_COMMAND], cwd=REPO, check=True, capture_output=True)
        startup.append(time.perf_counter() - start)
    row["new_process_startup_s"] = round(statistics.median(startup), 2)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        painted_file, more_file = folder / "painted.seg.nrrd", folder / "more.seg.nrrd"
        write_segmentation(painted_file, labels)
        write_segmentation(more_file, more)
        cache = folder / "cache"
        with_built_encoders(cache, encoders)
        # Encodes the scan, and leaves a run record with the one more slice painted.
        timed_cli_propagate(image, more_file, folder / "first.seg.nrrd", cache, encoder)
        cli_full, cli_more, standby_full, standby_more = [], [], [], []
        for index in range(repeats):
            # The record holds the one-more-slice painting: the painting before it erases a slice, so it is a full
            # run on cached embeddings; the one-more-slice run after it is warm-started from that full run.
            cli_full.append(timed_cli_propagate(image, painted_file, folder / f"full{index}.seg.nrrd", cache,
                                                encoder)["total_s"])
            cli_more.append(timed_cli_propagate(image, more_file, folder / f"more{index}.seg.nrrd", cache,
                                                encoder)["total_s"])
        with contextlib.closing(slicer_worker().StandbyProcessFactory()) as standbys:
            for index in range(repeats):
                standby_full.append(timed_standby_propagate(standbys, cli_propagate_command(
                    image, painted_file, folder / f"standby-full{index}.seg.nrrd", cache, encoder)))
                standby_more.append(timed_standby_propagate(standbys, cli_propagate_command(
                    image, more_file, folder / f"standby-more{index}.seg.nrrd", cache, encoder)))
        engine = Engine(EngineOptions(cache_dir=str(cache), device="cpu", encoder=encoder_path))
        in_full, in_more = [], []
        for _ in range(repeats):
            in_full.append(timed_propagate(engine, scan.volume, labels)[0]["total_s"])
            in_more.append(timed_propagate(engine, scan.volume, more)[0]["total_s"])
    row["command_line"] = {"one_more_slice_s": statistics.median(cli_more), "full_run_s": statistics.median(cli_full)}
    row["standby_process"] = {"one_more_slice_s": statistics.median(standby_more),
                              "full_run_s": statistics.median(standby_full), "settle_s": STANDBY_SETTLE_S}
    row["in_process"] = {"one_more_slice_s": statistics.median(in_more), "full_run_s": statistics.median(in_full)}
    row["load_average_end"] = os.getloadavg()[0]
    return row


def cli_rerun_markdown(row: dict) -> str:
    cli, standby, inside = row["command_line"], row["standby_process"], row["in_process"]
    return "\n".join([
        f"Re-runs: {row['case']}; encoder {row['encoder']}; embeddings cached; medians; load average "
        f"{row['load_average_start']:.1f} at the start, {row['load_average_end']:.1f} at the end. The Slicer "
        f"module runs each job in a standby engine process started {standby['settle_s']} s before it.", "",
        "| re-run | command line, a new process (s) | the Slicer module: a standby process (s) | in this process (s) |",
        "|---|---|---|---|",
        f"| one more painted slice (warm-started) | {cli['one_more_slice_s']:.2f} | {standby['one_more_slice_s']:.2f} "
        f"| {inside['one_more_slice_s']:.2f} |",
        f"| the painting before it again (a full run) | {cli['full_run_s']:.2f} | {standby['full_run_s']:.2f} | "
        f"{inside['full_run_s']:.2f} |",
        "", f"A new process that only imports the engine and loads the model: {row['new_process_startup_s']:.2f} s.",
    ]) + "\n"


def machine_line() -> str:
    return f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def command_line_case_only(args, key: str, run_case, markdown) -> int:
    """--long-ct, --cli-rerun: one command-line case alone (run_case(encoders) -> its row, with the --cli-encoder
    built first), written to --out/<name>.json and .md under `key`."""
    model = load_model("litemedsam", device="cpu")
    with built_encoders(model, (args.cli_encoder,)) as (encoders, build):
        row = run_case(encoders)
    report = {"machine": machine_line(), "cpu": cpu_record(), key: row}
    write_results(args.out, args.name, report, f"Machine: {report['machine']}.\n\n" + markdown(row))
    return 0


def real_slices(scan, count: int = 8) -> torch.Tensor:
    """`count` model-input slices from the middle of a real scan."""
    from FewShotSAMLib.orientation import to_slices
    from FewShotSAMLib.preprocess import apply_normalisation, choose_normalisation, resize_stack_longest_side

    stack = to_slices(apply_normalisation(scan.volume.array, choose_normalisation(scan.volume)), scan.axis)
    middle = stack.shape[0] // 2
    images, _ = resize_stack_longest_side(stack[middle - count // 2:middle - count // 2 + count], 256, (1.0, 1.0))
    return images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit", action="store_true",
                        help="also time just-in-time torch.compile (about a minute to compile)")
    parser.add_argument("--no-ct", action="store_true", help="skip the 512x512x300 CT case (several minutes)")
    parser.add_argument("--ct-only", action="store_true",
                        help="run only the CT case and replace its row in an existing --out/speed.json")
    parser.add_argument("--long-ct", action="store_true",
                        help="run only the long CT case (vertebrae over part of a 512x512x300 CT), on demand against "
                             "--encode-all-slices, into --out/<name>.json and .md (several minutes)")
    parser.add_argument("--cli-rerun", action="store_true",
                        help="run only the CHAOS re-runs through the command line against in process, into "
                             "--out/<name>.json and .md (a few minutes)")
    parser.add_argument("--encoders-only", action="store_true",
                        help="run only the encoder table (paths, auto's probe, roofline), not the propagate cases")
    parser.add_argument("--encoder-slices", type=int, default=8,
                        help="real MRI slices the encoder table times each path on (default 8)")
    parser.add_argument("--built-paths", type=lambda text: tuple(text.split(",")), default=BUILT_PATHS,
                        help=f"only these built encoder paths, and no eager batch-8 or bf16 rows (default all: "
                             f"{','.join(BUILT_PATHS)}); for a quick look on a busy machine")
    parser.add_argument("--encoders", type=Path, default=None,
                        help="build the encoders in this folder and keep them (default: a temporary folder; the "
                             "build times are then those of a first run)")
    parser.add_argument("--case-paths", type=lambda text: tuple(text.split(",")), default=ENCODER_PATHS,
                        help=f"encoder paths of the CHAOS propagate case (default {','.join(ENCODER_PATHS)})")
    parser.add_argument("--cli-encoder", default=CLI_ENCODER, choices=BUILT_PATHS,
                        help=f"encoder path of --long-ct and --cli-rerun (default {CLI_ENCODER}, what `auto` picks "
                             "on the Zen 3; compiled where auto picks that)")
    parser.add_argument("--name", default="speed",
                        help="results file name, without extension (default speed: --out/speed.json and .md)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.ct_only:
        return rerun_ct_only(args)
    if args.long_ct:
        return command_line_case_only(
            args, "long_ct", lambda encoders: run_long_ct_case(args.data_dir, encoders, args.cli_encoder),
            long_ct_markdown)
    if args.cli_rerun:
        return command_line_case_only(
            args, "cli_rerun", lambda encoders: run_cli_rerun_case(args.data_dir, encoders, args.repeats,
                                                                   args.cli_encoder),
            cli_rerun_markdown)
    torch.manual_seed(0)
    report = {"machine": machine_line(), "cpu": cpu_record(), "cases": []}
    model = load_model("litemedsam", device="cpu")
    chaos = load_scan("chaos", "5", args.data_dir)
    with built_encoders(model, args.built_paths, args.encoders) as (encoders, build):
        report["encoder_build_s"] = build["built_s"]
        report["encoder_slices"] = args.encoder_slices
        report["encoder"] = encoder_paths(model, real_slices(chaos, args.encoder_slices), args.repeats, encoders,
                                          args.jit, build, eager_variants=args.built_paths == BUILT_PATHS)
        report["roofline"] = roofline(report["cpu"], encoder_gflop_per_slice(model), report["encoder"])
        report["auto"] = probed_auto(model, encoders)
        scan_encode_s = None if args.encoders_only else eager_scan_encode_seconds(model, chaos)
        row = {"case": f"CHAOS MRI {'x'.join(map(str, chaos.volume.array.shape[::-1]))}", "paths": [],
               "eager_fp32_encode_s": None if scan_encode_s is None else round(scan_encode_s, 2),
               "load_average": os.getloadavg()[0]}
        for encoder in args.case_paths if not args.encoders_only else ():
            if encoder in build["failed"]:  # e.g. the compiled bf16 encoder on a CPU without bf16
                continue
            row["paths"].append(propagate_case(model, chaos, encoder, args.repeats, encoders, scan_encode_s))
        report["cases"].append(row)
        if not (args.no_ct or args.encoders_only):
            report["cases"].append(ct_row(args.data_dir, encoders))
    report["peak_rss_gib_main_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    write_results(args.out, args.name, report, to_markdown(report))
    return 0


def ct_row(data_dir: Path, encoders: Path) -> dict:
    ct = run_ct_case(data_dir, encoders)
    return {"case": f"TotalSegmentator CT {'x'.join(map(str, ct['shape'][::-1]))} (20 real slices x {CT_REPEATS})",
            "paths": [ct]}


def rerun_ct_only(args) -> int:
    path = args.out / "speed.json"
    report = json.loads(path.read_text())
    report["cases"] = [case for case in report["cases"] if not case["case"].startswith("TotalSegmentator")]
    with built_encoders(load_model("litemedsam", device="cpu")) as (encoders, _):
        report["cases"].append(ct_row(args.data_dir, encoders))
    write_results(args.out, "speed", report, to_markdown(report))
    return 0


def to_markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}.", "", *encoder_markdown(report)]
    lines += ["", "| case | encoder | cold propagate (s) | of which encode (s) | warm propagate, median (s) | "
              "prompts (s) | tuning (s) | prediction (s) | one more slice, median (s) | cold / warm / one more, "
              "x eager fp32 encode | mean Dice | one more slice: Dice warm-started / from scratch | "
              "peak memory (GiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for row in case["paths"]:
            fractions = row.get("fraction_of_eager_fp32_encode")
            fractions = "-" if fractions is None else " / ".join(
                f"{fractions[name]:.2f}" for name in ("cold", "warm", "one_more_slice"))
            one_more = row.get("one_more_slice_dice")
            one_more = "-" if one_more is None else f"{one_more['warm_start']:.3f} / {one_more['from_scratch']:.3f}"
            lines.append(f"| {case['case']} | {row['encoder']} | {row['cold']['total_s']} | "
                         f"{row['cold'].get('encode_s', '-')} | {row['warm_median_s']} | "
                         f"{row.get('prompts_median_s', '-')} | {row.get('tune_median_s', '-')} | "
                         f"{row.get('predict_median_s', '-')} | {row.get('one_more_slice_median_s', '-')} | "
                         f"{fractions} | {row['mean_dice']:.3f} | {one_more} | {row.get('peak_rss_gib', '-')} |")
    for case in report["cases"]:
        if "eager_fp32_encode_s" in case:
            lines += ["", f"{case['case']}: eager fp32 (batch 1) encodes the whole scan in "
                      f"{case['eager_fp32_encode_s']} s (load average {case['load_average']:.1f} when measured)."]
    lines += ["", f"Peak resident memory of the benchmark's main process: {report['peak_rss_gib_main_process']} GiB."]
    return "\n".join(lines) + "\n"


def cpu_numbers(cpu: dict) -> str:
    """' (AuthenticAMD, family 26, model 2)' where the record has them (results of older runs do not)."""
    if "family" not in cpu:
        return ""
    return f" ({cpu.get('vendor', 'vendor unknown')}, family {cpu['family']}, model {cpu.get('model_number', '?')})"


def encoder_markdown(report: dict) -> list[str]:
    """The CPU, the one-off builds, the encoder table with the roofline, and auto's probe."""
    build = report.get("encoder_build_s", {})
    cpu, roof, auto = report.get("cpu"), report.get("roofline", {}), report.get("auto")
    lines = []
    if cpu:
        lines += [f"CPU: {cpu['model']}{cpu_numbers(cpu)}, {cpu['cores']} cores, instruction sets "
                  f"{', '.join(cpu['instruction_sets'])}; clock {cpu['clock_ghz']} GHz ({cpu['clock_source']}); "
                  f"1-minute load average at the start {cpu['load_average_1min']}.", ""]
    lines += ["One-off builds on a first run (then kept in the cache's .encoders folder, s): "
              + ", ".join(f"{path} {seconds}" for path, seconds in build.items()) + ".", ""]
    if "fp32_peak_gflop_per_s" in roof:
        lines += [f"Encoder: {roof['gflop_per_slice']} GFLOP a slice (counted by torch FlopCounterMode). fp32 "
                  f"roofline: {roof['formula']} = {roof['fp32_peak_gflop_per_s']} GFLOP/s, "
                  f"{roof['roofline_slices_per_s']} slices/s.", ""]
    lines += [f"| encoder path (LiteMedSAM, 256x256, {report.get('encoder_slices', 8)} real MRI slices) | "
              "slices/s | ratio to eager fp32 batch 1 | "
              "GFLOP/s (fraction of fp32 roofline) | first call (s) | embedding difference to fp32 (relative) |",
              "|---|---|---|---|---|---|"]
    for row in report["encoder"]:
        if "cannot_run_here" in row:
            lines.append(f"| {row['path']} | cannot run here: {row['cannot_run_here']} | - | - | - | - |")
            continue
        difference = row.get("embedding_rel_diff_vs_fp32")
        achieved = f"{row['gflop_per_s']} ({row['fraction_of_fp32_roofline']:.2f})" if "gflop_per_s" in row else "-"
        lines.append(f"| {row['path']} | {row['slices_per_s']:.2f} | {row['ratio_to_eager_fp32']:.2f}x | {achieved} | "
                     f"{row['first_call_s']} | {'-' if difference is None else f'{difference:.1e}'} |")
    if auto:
        measured = ", ".join(f"{path} {seconds} s" for path, seconds in (auto["seconds_per_slice"] or {}).items())
        lines += ["", f"`auto` picks **{auto['chosen']}** here (probe {auto['probe_s']} s with the encoders built; "
                  f"fastest of {PROBE_ROUNDS} rounds of one slice: {measured or '-'}; "
                  f"failed: {auto['failed'] or 'none'})."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
