"""The `fewshotsam` command line: propagate, adapt, apply, demo, cache and serve (the web app)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import catalog
from .errors import Cancelled, FewShotSAMError, FewShotSAMWarning, one_line

MODEL_NAMES = catalog.values(catalog.MODELS)


def _slice_list(text: str) -> list[int]:
    """'3,7,10-12' -> [3, 7, 10, 11, 12]"""
    values = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            first, last = _slice_range(part)
            values.extend(range(first, last + 1))
        elif part:
            values.append(_whole_number(part, text))
    if not values:
        raise argparse.ArgumentTypeError(f"'{text}' names no slice or value; e.g. 3,7,10-12")
    return values


def _slice_range(text: str) -> tuple[int, int]:
    """'10-25' -> (10, 25); '10' -> (10, 10). Reversed ranges are refused, not silently emptied."""
    first, separator, last = text.strip().partition("-")
    first_value = _whole_number(first, text)
    last_value = _whole_number(last, text) if separator else first_value
    if last_value < first_value:
        raise argparse.ArgumentTypeError(f"'{text}' is reversed; give FIRST-LAST with FIRST <= LAST")
    return first_value, last_value


def _whole_number(part: str, text: str) -> int:
    try:
        value = int(part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': '{part}' is not a whole number >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}': '{part}' is not a whole number >= 0")
    return value


def _window(text: str) -> tuple[float, float]:
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LEVEL,WIDTH (two numbers, e.g. 40,400)") from None
    return level, width


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", choices=MODEL_NAMES, default=catalog.DEFAULT_MODEL,
                       help="segmentation model; litemedsam (default) ships with the package, the others need "
                            "--checkpoint")
    group.add_argument("--checkpoint", help="weights file for sam_vit_b/l/h (Meta's SAM) or medsam_vit_b (MedSAM)")
    group.add_argument("--device", choices=catalog.values(catalog.DEVICES), default="auto",
                       help="where to run the model (default: a GPU if PyTorch sees one, else the CPU)")
    group.add_argument("--cache-dir", help="embedding cache folder (default: the per-user cache folder, or "
                                           "$FEWSHOTSAM_CACHE_DIR); scans encoded once are never encoded again")
    group.add_argument("--seed", type=int, default=0, help="random seed: same inputs and seed give the same result")
    group.add_argument("--axis", choices=catalog.values(catalog.SLICE_PLANES), default="auto",
                       help="slice orientation; auto picks the image axis closest to axial from the direction matrix")
    group.add_argument("--window", type=_window, metavar="LEVEL,WIDTH",
                       help="CT intensity window, e.g. 40,400 (default for CT: soft tissue; MR uses percentiles)")
    group.add_argument("--preset", help="CT window preset: soft-tissue, abdomen, liver, lung, bone, brain")
    group.add_argument("--segments", type=_slice_list, metavar="VALUES",
                       help="label values to propagate, e.g. 1,3 (default: every painted one)")
    group.add_argument("--labelled-slices", type=_slice_list, metavar="SLICES",
                       help="extra slice indices (along the slice axis) that are fully labelled even if empty: "
                            "they teach the model where structures are absent, e.g. 0,5,30-32")
    group.add_argument("--decoder-steps", type=int, default=None,
                       help="mask decoder tuning steps (default 16; 0 keeps the pretrained decoder)")
    group.add_argument("--tuning-precision", choices=catalog.values(catalog.TUNING_PRECISIONS),
                       default=catalog.DEFAULT_TUNING_PRECISION,
                       help="arithmetic of the decoder's tuning: fp32 (default), auto (bf16 on a CPU with bf16 "
                            "instructions, fp32 elsewhere: ~23%% faster tuning with the same Dice within one scan, "
                            "but a model applied to another scan lost Dice in one check) or bf16")
    group.add_argument("--encoder", choices=catalog.values(catalog.ENCODER_PATHS), default="auto",
                       help="how the image encoder runs: compiled or compiled-fp32 (built once for this CPU, bf16 "
                            "or fp32), openvino or onnx (OpenVINO or ONNX Runtime, fp32, CPU), openvino-bf16 "
                            "(OpenVINO, bf16, CPUs with bf16 instructions), fp32 or bf16 "
                            "(PyTorch); auto measures the CPU paths once and picks the fastest that runs here, else "
                            "bf16 where supported, else fp32")
    group.add_argument("--no-clean-up", action="store_true",
                       help="skip the 3D clean-up (keep components connected to the painting, fill holes)")
    group.add_argument("--slice-range", type=_slice_range, metavar="FIRST-LAST",
                       help="predict only these slices (e.g. 10-25); others keep only their painted labels")
    group.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    group.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress display: a bar on stderr, JSON lines on stdout (for other programs), or none")


COHORT_FROM = 8  # more scans than this (or a glob, a folder, a list) make `apply` a cohort run


def _add_cohort_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cohort (many scans on Dask; needs pip install 'fewshotsam[cohort]')",
        f"More than {COHORT_FROM} scans, a glob, a folder of scans, a list, --workers or --scheduler make a cohort "
        "run: scans whose output exists are skipped (--overwrite redoes them), a scan that fails is reported and "
        "the others go on, and <out-dir>/summary.csv lists every scan with its status, error, time and each "
        "structure's volume (mL), slice count, confidence and review flag.")
    group.add_argument("--workers", type=int, metavar="N",
                       help="worker processes on this machine (a Dask LocalCluster; default about one per two "
                            "cores); 0 runs the cohort in this process")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask cluster's scheduler, e.g. tcp://host:8786 (scans, model and "
                            "--out-dir must be at the same paths on every worker)")
    group.add_argument("--retries", type=int, default=2, metavar="N",
                       help="times a scan moves to another worker after its worker died (default 2; on an "
                            "existing cluster its scheduler's allowed-failures setting decides)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewshotsam",
        description="Few-shot Segment Anything: paint a structure on a few slices, get it segmented through the "
                    "whole 3D scan.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    propagate = commands.add_parser("propagate", help="adapt on a scan's painted slices and segment the whole scan",
                                    description="Adapt on the painted slices of LABELS and segment IMAGE. Output "
                                                "label values, names and colours are the input's.")
    propagate.add_argument("image", help="3D image: .nrrd, .nii/.nii.gz, .mha or a DICOM series folder")
    propagate.add_argument("--labels", required=True,
                           help="painted labels on the image's grid: label map (.nrrd/.nii.gz/.mha) "
                                "or Slicer .seg.nrrd")
    propagate.add_argument("--out", required=True, help="output: .seg.nrrd (Slicer), .nrrd or .nii.gz label map")
    propagate.add_argument("--report", nargs="?", const="", metavar="PATH",
                           help="also say how sure each slice is and which slice of each structure to paint next: "
                                "printed, and written as JSON to PATH (default: beside --out, as "
                                "<name>.report.json)")
    propagate.add_argument("--no-warm-start", action="store_true",
                           help="adapt from scratch even when an earlier run on this scan, with the same options and "
                                "fewer painted slices, is in the cache (by default a re-run after painting more "
                                "slices starts from it and predicts only next to the changed slices)")
    propagate.add_argument("--encode-all-slices", action="store_true",
                           help="encode every slice before adapting (by default only the painted slices are, then "
                                "the slices the structures reach: the same result, faster when they span part of "
                                "the scan); for measuring what that saves")
    propagate.add_argument("--no-zoom", action="store_true",
                           help="skip the second look at structures too small for the model's grid (by default each "
                                "one spanning under 8 of its 64 cells across a slice is segmented again on a crop "
                                "around it, magnified to the model's input size)")
    _add_engine_options(propagate)

    adapt = commands.add_parser("adapt", help="save a few-shot model (.fsam) from one or more labelled scans",
                                description="Learn from the labelled slices of one or more scans and save the "
                                            "few-shot collection and tuned decoder as one .fsam file.")
    adapt.add_argument("--image", action="append", required=True, help="a 3D image (repeat for several scans)")
    adapt.add_argument("--labels", action="append", required=True, help="its labels (one --labels per --image)")
    adapt.add_argument("--out", required=True, help="output .fsam file")
    adapt.add_argument("--register", action="store_true",
                       help="keep a small copy of the (single) support scan in the model, at most 96 voxels a side "
                            "(~0.3 MB), so that `apply --register` can register it to each new scan; the copy is a "
                            "low-resolution image of the patient: share such a model as you would the scan")
    _add_engine_options(adapt)

    apply = commands.add_parser("apply", help="segment new scans with a saved .fsam model (no labels needed)")
    apply.add_argument("fsam", help="a .fsam file written by 'fewshotsam adapt'")
    apply.add_argument("images", nargs="+",
                       help="3D images to segment: files, DICOM series folders, folders of scans, quoted globs "
                            "('archive/**/*.nii.gz') or .txt/.csv lists of paths")
    apply.add_argument("--out-dir", required=True, help="folder for the results (<image>_fewshotsam.seg.nrrd)")
    apply.add_argument("--format", choices=(".seg.nrrd", ".nrrd", ".nii.gz"), default=".seg.nrrd",
                       help="output file type (default .seg.nrrd)")
    apply.add_argument("--no-second-pass", action="store_true",
                       help="predict each scan once (by default the model is tuned on for a few steps on the scan's "
                            "own most confident slices and the scan predicted again: better Dice on scans of "
                            "other patients, about 6 s more per scan on a 2-core CPU)")
    apply.add_argument("--register", action="store_true",
                       help="register the model's support scan to each scan (a few seconds) and read the model's "
                            "positions where each scan's anatomy lies in the support: protocol 2 on CHAOS 0.802 -> "
                            "0.831 Dice, but spleen -0.016 (benchmarks/results/protocol2_registered.md); models made "
                            "on several scans, or before this option, apply as without it")
    _add_engine_options(apply)
    _add_cohort_options(apply)

    demo = commands.add_parser("demo", help="run propagate on the bundled sample scan and report the Dice")
    demo.add_argument("--out-dir", default="fewshotsam-demo", help="folder for the demo's outputs")
    demo.add_argument("--slices-per-structure", type=int, default=3, help="labelled slices per organ (default 3)")
    _add_engine_options(demo)

    cache = commands.add_parser("cache", help="show or clear the embedding cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("--cache-dir", help="cache folder (default: the per-user cache folder)")

    serve = commands.add_parser("serve", help="start the web app (needs the 'web' extra) and print its URL",
                                description="Serve FewShotSAM in the browser: Slicer's slice and 3D views, the segment "
                                            "editor, Adapt & Propagate and export. Reach it on a remote server "
                                            "through an SSH tunnel: ssh -L 8080:localhost:8080 server.")
    serve.add_argument("scan", nargs="?", help="scan to open at start: .nrrd/.nii.gz/.mha file or DICOM folder")
    serve.add_argument("--host", default="localhost", help="address to listen on (default localhost only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--device", choices=catalog.values(catalog.DEVICES), default="auto",
                       help="where the worker runs the model")
    serve.add_argument("--cache-dir", help="embedding cache folder (default: the per-user cache folder)")
    serve.add_argument("--work-dir", help="folder for uploads, exports and worker files (default: a new temp folder)")
    return parser


def engine_options(args):
    from .adapter import AdaptOptions
    from .pipeline import EngineOptions
    from .propagation import PropagationOptions
    from .second_pass import SecondPassOptions
    from .zoom import ZoomOptions

    adapt = AdaptOptions(seed=args.seed, tuning_precision=args.tuning_precision)
    if args.decoder_steps is not None:
        if args.decoder_steps < 0:
            raise FewShotSAMError("--decoder-steps must be 0 or more")
        adapt.decoder_steps = args.decoder_steps
    slice_range = args.slice_range
    return EngineOptions(
        model=args.model, checkpoint=args.checkpoint, device=args.device, cache_dir=args.cache_dir, axis=args.axis,
        window=args.window, preset=args.preset, segments=args.segments, labelled_slices=args.labelled_slices,
        encoder=args.encoder,
        adapt=adapt, propagation=PropagationOptions(clean_up=not args.no_clean_up, slice_range=slice_range),
        warm_start=not getattr(args, "no_warm_start", False),  # only propagate has the option
        encode_all_slices=getattr(args, "encode_all_slices", False),  # likewise
        zoom=ZoomOptions(enabled=not getattr(args, "no_zoom", False)),  # likewise
        second_pass=SecondPassOptions(enabled=not getattr(args, "no_second_pass", False)),  # only apply has it
        register=getattr(args, "register", False),  # adapt and apply have it
    )


def make_progress(kind: str, second_pass: bool):
    """second_pass: whether the run has apply's second pass (the other runs' bars end at 100%, not jump there)."""
    from .progress import APPLY_STAGES, RUN_STAGES, Progress

    stages = APPLY_STAGES if second_pass else RUN_STAGES

    if kind == "json":
        def report(event):
            print(json.dumps({"stage": event.stage, "done": event.done, "total": event.total,
                              "fraction": round(event.fraction, 4), "message": event.message}), flush=True)
        return Progress(report, stages=stages), lambda: None
    if kind == "bar":
        from tqdm import tqdm

        bars = []  # created at the first real work, so that input errors print one clean line

        def report(event):
            if event.stage == "load":
                return
            if not bars:
                bars.append(tqdm(total=100, unit="%", file=sys.stderr,
                                 bar_format="{l_bar}{bar}| {elapsed}<{remaining}"))
            bars[0].set_description_str(event.message[:40].ljust(40))
            bars[0].update(round(event.fraction * 100) - bars[0].n)
        return Progress(report, stages=stages), lambda: bars and bars[0].close()
    return Progress(), lambda: None


def run(args) -> int:
    if args.command == "cache":
        return run_cache(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "adapt" and len(args.image) != len(args.labels):
        raise FewShotSAMError("give one --labels for each --image")
    options = engine_options(args)
    if args.command == "apply" and wants_cohort(args):
        return run_cohort(args, options)
    progress, close = make_progress(args.progress, args.command == "apply" and options.second_pass.enabled)
    report = None
    try:
        if args.command == "propagate":
            from .pipeline import propagate_files

            recorder, report_path = confidence_request(args)
            written = [propagate_files(args.image, args.labels, args.out, options, args.overwrite, progress,
                                       confidence=recorder)]
            if recorder is not None:
                from .confidence import write_report

                report = recorder.report()
                written.append(write_report(report_path, report, args.overwrite))
        elif args.command == "adapt":
            from .pipeline import adapt_files

            written = [adapt_files(list(zip(args.image, args.labels)), args.out, options, args.overwrite, progress)]
        elif args.command == "apply":
            from .pipeline import apply_files

            written = apply_files(args.fsam, args.images, args.out_dir, options, args.overwrite, args.format, progress)
        else:
            from .demo import run_demo

            written = run_demo(Path(args.out_dir), args.slices_per_structure, options, args.overwrite, progress)
        if progress.callback is not None:
            progress.update("write", 1, 1, "done")
    finally:
        close()
    if args.progress == "json":
        done = {"stage": "done", "done": 1, "total": 1, "fraction": 1.0, "message": "done",
                "outputs": [str(path) for path in written]}
        if report is not None:
            done["report"] = report.as_json()
        print(json.dumps(done), flush=True)
    else:
        for path in written:
            print(f"wrote {path}")
        if report is not None:
            print(report.text())
    return 0


def confidence_request(args):
    """(recorder, report path) when propagate was asked for --report, else (None, None); the path is checked
    before any work, so that a report that cannot be written costs no run."""
    if getattr(args, "report", None) is None:
        return None, None
    from .confidence import ConfidenceRecorder, check_report_path, default_report_path

    path = Path(args.report) if args.report else default_report_path(args.out)
    return ConfidenceRecorder(), check_report_path(path, args.overwrite)


def wants_cohort(args) -> bool:
    """A cohort run for many scans, archive-style inputs or cluster options; else `apply` as it always was."""
    from .cohort_inputs import LIST_SUFFIXES, holds_dicom_series, is_glob

    if args.workers is not None or args.scheduler or len(args.images) > COHORT_FROM:
        return True
    for text in args.images:
        path = Path(text)
        if (not path.exists() and is_glob(text)) or (path.is_file() and path.name.lower().endswith(LIST_SUFFIXES)):
            return True
        if path.is_dir() and not holds_dicom_series(path):
            return True
    return False


def run_cohort(args, options) -> int:
    """`apply` over a cohort: progress over scans, then the summary's counts; exit code 1 when a scan failed."""
    from .cohort import apply_cohort, dashboard_line, dask_available

    if args.retries < 0:
        raise FewShotSAMError("--retries must be 0 or more")
    workers = args.workers
    if workers is None and not args.scheduler and not dask_available():
        print("fewshotsam: dask is not installed (pip install 'fewshotsam[cohort]'); segmenting the scans one "
              "after another in this process", file=sys.stderr)
        workers = 0
    on_scan, close = _scan_progress(args.progress)
    try:
        summary = apply_cohort(args.fsam, args.images, args.out_dir, options, overwrite=args.overwrite,
                               suffix=args.format, workers=workers, scheduler=args.scheduler, retries=args.retries,
                               on_scan=on_scan, on_cluster=lambda client: print(dashboard_line(client),
                                                                                file=sys.stderr))
    except KeyboardInterrupt:
        close()
        print(f"\nfewshotsam: interrupted; finished scans are in {args.out_dir} and {args.out_dir}/summary.csv; "
              f"run the same command again to go on", file=sys.stderr)
        return 130
    close()
    counts = summary.counts
    line = (f"{len(summary.rows)} scans: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed, "
            f"{len(summary.flagged)} flagged for review; wrote {summary.csv_path}")
    if args.progress == "json":
        print(json.dumps({"stage": "done", "done": 1, "total": 1, "fraction": 1.0, "message": line,
                          "summary": str(summary.csv_path), "counts": counts}), flush=True)
    else:
        print(line)
        for row in summary.rows_with("failed")[:10]:
            print(f"failed: {row['error']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _scan_progress(kind: str):
    """on_scan(done, total, row) for apply_cohort, and a function closing the display."""
    if kind == "json":
        def report(done, total, row):
            print(json.dumps({"stage": "scan", "done": done, "total": total, "fraction": round(done / total, 4),
                              "message": row["path"], "status": row["status"], "error": row["error"]}), flush=True)
        return report, lambda: None
    if kind == "bar":
        from tqdm import tqdm

        bars = []
        failed = []

        def report(done, total, row):
            if not bars:
                bars.append(tqdm(total=total, unit="scan", file=sys.stderr))
            failed.extend([1] if row["status"] == "failed" else [])
            bars[0].set_postfix_str(f"{len(failed)} failed")
            bars[0].update(done - bars[0].n)
        return report, lambda: bars and bars[0].close()
    return None, lambda: None


def run_cache(args) -> int:
    from .embedding_cache import EmbeddingCache

    cache = EmbeddingCache(args.cache_dir)
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} cached volumes, the built encoders and the run records from {cache.root}")
    else:
        entries = cache.entries()
        print(f"{cache.root}: {len(entries)} cached volumes, {cache.size_bytes() / 2**20:.1f} MiB "
              f"(cap {cache.max_bytes / 2**30:.1f} GiB)")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings about the user's input as one plain line, like errors; others as Python shows them."""
    if issubclass(category, FewShotSAMWarning):
        print(f"fewshotsam: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def web_app_module():
    """The web app package (FewShotSAM/FewShotSAMWebApp of a source checkout), imported only when serving.

    FewShotSAMLib itself never imports slicer, qt or trame: the web app and the extension's shared logic live beside
    the Slicer module and need the 'web' extra.
    """
    module_folder = Path(__file__).resolve().parents[1] / "FewShotSAM"
    if not (module_folder / "FewShotSAMWebApp").is_dir():
        raise FewShotSAMError(f"the web app is not in {module_folder}; serve needs a source checkout "
                              "(git clone, then pip install -e \".[web]\")")
    if str(module_folder) not in sys.path:
        sys.path.insert(0, str(module_folder))
    try:
        from FewShotSAMWebApp import app
    except ImportError as error:
        raise FewShotSAMError(f"the web app cannot start ({error}); "
                              "install it with pip install -e \".[web]\"") from None
    return app


def run_serve(args) -> int:
    if args.scan and not Path(args.scan).exists():
        raise FewShotSAMError(f"{args.scan}: no such scan file or DICOM folder")
    app = web_app_module()
    app.serve(scan=args.scan, host=args.host, port=args.port, workDirectory=args.work_dir, device=args.device,
              cacheDirectory=args.cache_dir)
    return 0


def exit_now(code: int):
    """End this command-line process with `code`, skipping Python's teardown: with torch and the model loaded it
    takes over a second (measured 1.1-1.4 s on a 2-core Xeon), which the Slicer module, scripts and shells would
    wait for after the work is done. Every output file is written and closed by then; only stdio and logging
    still hold buffered text."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except Cancelled as error:
        written = str(error) != str(Cancelled())  # apply says which results it wrote before the cancel
        print(f"fewshotsam: {error}" if written else "fewshotsam: cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nfewshotsam: interrupted; nothing was written", file=sys.stderr)
        return 130
    except FewShotSAMError as error:
        # One line, whatever a library put into the message it passed on.
        print(f"fewshotsam: error: {one_line(error, None, with_type=False)}", file=sys.stderr)
        return 2
