"""Accuracy benchmark (issue 3): FewShotSAM against Slicer's tools and prompted SAM, on real scans.

    python -m benchmarks.accuracy.run [--quick] [--ks 1,3,5] [--protocols 1,2,3] [--train-sizes 1,2,4]
                                      [--datasets chaos,hippocampus,totalseg,totalseg_small,totalseg_mr,spinal_cord]
                                      [--out benchmarks/results] [--cache-dir DIR] [--data-dir DIR]

Protocol 1 (within one scan): k fully labelled slices per structure (``slice_selection.few_shot_labels``), the
whole volume segmented by each method, scored with ``metrics.score_labels``.
Protocol 2 (across scans, CHAOS only): the published 1-shot setting (Ouyang et al., ECCV 2020): a support scan with
3 labelled slices per organ at 1/6, 1/2, 5/6 of its extent adapts FewShotSAM, which then segments unlabelled
query scans.
Protocol 3 (labelled data vs accuracy, across scans, CHAOS only): FewShotSAM adapted on every labelled slice of the
first n training scans of a fold (``--train-sizes``), then applied to the fold's unlabelled query scans. The folds
are ``datasets.chaos_training_folds``, the supervised U-Net's, so its data-size curve is trained and tested on the
same scans. ``--scans`` restricts the queries (e.g. ``--protocols 3 --train-sizes 1 --scans 15``: a smoke run).

Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy_dice_vs_k.png`` into ``--out`` (rewritten after every
scan, so an interrupted run leaves its partial results, marked as such) and prints the markdown. Progress goes to
stderr. ``--quick``: CHAOS scans 2 and 15, k=3, FewShotSAM + Fill between slices + SAM box, protocol 1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from FewShotSAMLib import catalog
from FewShotSAMLib.adapter import AdaptOptions
from FewShotSAMLib.atomic_write import write_text_atomically
from FewShotSAMLib.body_frame import AUTO_FRAME, FRAMES
from FewShotSAMLib.metrics import score_labels
from FewShotSAMLib.pipeline import Engine, EngineOptions
from FewShotSAMLib.progress import Progress
from FewShotSAMLib.registration import STAGE as REGISTER_STAGE
from FewShotSAMLib.second_pass import SecondPassOptions
from FewShotSAMLib.slice_selection import few_shot_labels, fractions_of_extent
from FewShotSAMLib.tuning import TUNING_PRECISIONS

from ..shared_data import default_data_dir
from . import report
from .datasets import CHAOS_CASES, DATASETS, Scan, chaos_training_folds, load_scan, scan_names
from .report import (
    FEWSHOTSAM,
    FEWSHOTSAM_NO_BLEND,
    FEWSHOTSAM_NO_THIN,
    FEWSHOTSAM_NO_TUNING,
    FEWSHOTSAM_NO_ZOOM,
    FILL,
    GROW,
    SAM_BOX,
    SAM_POINT,
)
from .sam_baselines import BOX, POINT, prompted_sam

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = Path("/tmp/fewshotsam-bench-cache")
METHOD_KEYS = {
    "fewshotsam": FEWSHOTSAM,
    "notuning": FEWSHOTSAM_NO_TUNING,
    "noblend": FEWSHOTSAM_NO_BLEND,
    "nozoom": FEWSHOTSAM_NO_ZOOM,
    "nothin": FEWSHOTSAM_NO_THIN,
    "point": SAM_POINT,
    "box": SAM_BOX,
    "fill": FILL,
    "grow": GROW,
}
QUICK_METHODS = ["fewshotsam", "fill", "box"]
PROTOCOL2_FRACTIONS = (1 / 6, 1 / 2, 5 / 6)
ACROSS_SCANS_METHODS = [FEWSHOTSAM, FEWSHOTSAM_NO_TUNING]  # protocols 2 and 3: an adapter made on other scans
DEFAULT_TRAIN_SIZES = [1, 2, 4]
JSON_NAME, MD_NAME, PNG_NAME = "accuracy.json", "accuracy.md", "accuracy_dice_vs_k.png"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CHAOS scans 2 and 15, k=3, FewShotSAM + Fill between slices + SAM box, protocol 1")
    parser.add_argument("--datasets", default=None, help=f"comma list of {','.join(DATASETS)} (default: all)")
    parser.add_argument("--ks", default=None, help="comma list of labelled slices per structure (default 1,3,5)")
    parser.add_argument("--methods", default=None,
                        help=f"comma list of {','.join(METHOD_KEYS)} "
                             f"(default: all; --quick: {','.join(QUICK_METHODS)})")
    parser.add_argument("--protocols", default=None, help="comma list of 1,2,3 (default: 1,2,3; --quick: 1)")
    parser.add_argument("--scans", default=None,
                        help="only these scan names (e.g. 2,15 or hippocampus_001); protocols 2 and 3: query scans")
    parser.add_argument("--train-sizes", default=None,
                        help="protocol 3: comma list of training-scan counts per fold (default 1,2,4)")
    parser.add_argument("--hippocampus-scans", type=int, default=10,
                        help="first N hippocampus scans in sorted order (default 10)")
    parser.add_argument("--totalseg-ks", default=None,
                        help="ks for TotalSegmentator CT (default: --ks); e.g. 3 to save time")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="shared data folder (default: $FEWSHOTSAM_DATA or <repo>/../shared/data)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"persistent embedding cache (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--model", default="litemedsam", help="litemedsam (default), sam_vit_b, ...")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file for models that need one")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--encoder", default="auto", choices=catalog.values(catalog.ENCODER_PATHS),
                        help="how the image encoder runs (default auto: the product's default); e.g. onnx gives "
                             "the fp32 embeddings to check that a faster path leaves Dice unchanged")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-second-pass", action="store_true",
                        help="protocols 2 and 3: apply without its second pass on the query's confident slices "
                             "(FewShotSAMLib/second_pass.py), to measure what the second pass adds")
    parser.add_argument("--position-frame", default=AdaptOptions.position_frame, choices=(AUTO_FRAME, *FRAMES),
                        help="where new adapters measure positions: body (relative to the body's box on each slice; "
                             "FewShotSAMLib/body_frame.py), image (the model-input square, as before) or auto (the "
                             "default: body across scans, image within one)")
    parser.add_argument("--tuning-precision", default=AdaptOptions.tuning_precision, choices=TUNING_PRECISIONS,
                        help="the decoder's forward passes while tuning (FewShotSAMLib/tuning.py tuning_autocast; "
                             "default fp32; auto: bf16 on a CPU with bf16 instructions, else fp32)")
    parser.add_argument("--register", default="off", choices=("on", "off"),
                        help="protocols 2 and 3: register the support scan to each query and read the pixel prompts "
                             "and footprints at the registered positions (FewShotSAMLib/registration.py)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite accuracy.md and the plot from --out/accuracy.json "
                             "(and --out/supervised.json when present)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records of an earlier run in --out (same model) and skip what they cover")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    args.datasets = _csv(args.datasets) if args.datasets else (["chaos"] if args.quick else
                                                               list(DATASETS))
    args.ks = [int(k) for k in _csv(args.ks)] if args.ks else ([3] if args.quick else [1, 3, 5])
    args.totalseg_ks = [int(k) for k in _csv(args.totalseg_ks)] if args.totalseg_ks else args.ks
    method_keys = _csv(args.methods) if args.methods else (QUICK_METHODS if args.quick else list(METHOD_KEYS))
    unknown = [key for key in method_keys if key not in METHOD_KEYS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; use {', '.join(METHOD_KEYS)}")
    args.methods = [METHOD_KEYS[key] for key in method_keys]
    args.protocols = [int(p) for p in _csv(args.protocols)] if args.protocols else ([1] if args.quick else [1, 2, 3])
    args.train_sizes = [int(n) for n in _csv(args.train_sizes)] if args.train_sizes else DEFAULT_TRAIN_SIZES
    args.scans = _csv(args.scans) if args.scans else None
    if any(p not in (1, 2, 3) for p in args.protocols):
        parser.error(f"unknown protocol(s) in {args.protocols}; use 1, 2, 3")
    if 3 in args.protocols:
        largest = min(len(train) for _, train, _ in chaos_training_folds())
        if any(n < 1 or n > largest for n in args.train_sizes):
            parser.error(f"--train-sizes must lie in 1..{largest}")
    for dataset in args.datasets:
        if dataset not in DATASETS:
            parser.error(f"unknown dataset {dataset!r}")
    if any(k < 1 for k in args.ks + args.totalseg_ks):
        parser.error("k must be >= 1")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", "FewShotSAMLib"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + (" + uncommitted FewShotSAMLib changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def clean_number(value):
    """JSON-safe: non-finite floats become null (inf distance = one mask empty; nan = structure absent)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def score(scan: Scan, prediction: np.ndarray) -> dict:
    scores = score_labels(prediction, scan.reference, list(scan.structures), scan.spacing_ijk, scan.axis)
    return {scan.structures[value]: {metric: clean_number(v) for metric, v in metrics.items()}
            for value, metrics in scores.items()}


def labelled_count(painted: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    return int(np.count_nonzero(np.asarray(painted).any(axis=other)))


class Benchmark:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.started = time.time()
        self.commit = git_commit()  # at start: the FewShotSAMLib code this process imported
        self.engine = Engine(EngineOptions(model=args.model, checkpoint=args.checkpoint, device=args.device,
                                           encoder=args.encoder, cache_dir=str(args.cache_dir),
                                           # every k from scratch: k = 3 must not start from the k = 1 run's record
                                           warm_start=False, adapt=AdaptOptions(position_frame=args.position_frame,
                                                                             tuning_precision=args.tuning_precision),
                                           second_pass=SecondPassOptions(enabled=not args.no_second_pass),
                                           register=args.register == "on"))
        self.decoder_steps = self.engine.options.adapt.decoder_steps
        self.records: list[dict] = []
        self.encoding_seconds: dict[str, dict[str, float]] = {}
        self.status = "partial: running (or stopped before the end)"
        self.plan: list[str] = []
        self.folds_text = ""
        self.protocol3_folds: list[dict] = []
        self.history: list[dict] = []  # earlier invocations whose records --resume kept
        if args.resume:
            self._load_previous()

    # ----- bookkeeping -------------------------------------------------------------------------------------------

    def _load_previous(self) -> None:
        path = self.out / JSON_NAME
        if not path.exists():
            return
        previous = json.loads(path.read_text())
        if previous.get("run", {}).get("weights_id") != self.engine.model.weights_id:
            log(f"--resume: {path} was made with another model; starting afresh")
            return
        self.records = previous.get("records", [])
        run = previous.get("run", {})
        self.history = list(run.get("history", [])) + [
            {key: run.get(key) for key in ("started", "wall_seconds", "commit", "status", "command")}]
        self.encoding_seconds = previous.get("run", {}).get("encoding_seconds", {})
        log(f"--resume: {len(self.records)} records kept from {path}")

    def done(self, **key) -> bool:
        return any(all(r.get(name) == value for name, value in key.items()) for r in self.records)

    def add(self, record: dict) -> None:
        """Add a record, replacing the one it redoes (protocol 3 records of one query differ by training size)."""
        key = ("protocol", "dataset", "scan", "method", "k", "train_size")
        self.records = [r for r in self.records if not all(r.get(name) == record.get(name) for name in key)]
        self.records.append(record)

    def coverage(self) -> list[str]:
        lines = list(self.plan)
        for protocol in (1, 2, 3):
            for dataset in dict.fromkeys(r["dataset"] for r in self.records if r["protocol"] == protocol):
                mine = [r for r in self.records if r["protocol"] == protocol and r["dataset"] == dataset]
                scans = list(dict.fromkeys(r["scan"] for r in mine))
                methods = list(dict.fromkeys(r["method"] for r in mine))
                if protocol == 3:
                    sizes = sorted({r["train_size"] for r in mine})
                    amount = f"training scans per model = {sizes}"
                else:
                    amount = f"k = {sorted({r['k'] for r in mine if r['k'] is not None}) or '–'}"
                lines.append(f"Done, protocol {protocol}, {dataset}: {len(scans)} scan(s) ({', '.join(scans)}); "
                             f"{amount}; methods: {', '.join(methods)}.")
        return lines

    def write(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        rows = report.summaries(self.records)
        supervised = report.load_supervised(self.out)  # benchmarks.supervised.run's results, if in the same folder
        plot = report.plot_dice_vs_k(rows, self.out / PNG_NAME, supervised)
        result = {
            "run": {
                "status": self.status,
                "started": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
                "wall_seconds": time.time() - self.started,
                "command": "python -m benchmarks.accuracy.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "model": self.args.model,
                "weights_id": self.engine.model.weights_id,
                "device": str(self.engine.model.device),
                "encoder": self.engine.model.encoder_path(self.args.encoder, self.engine.cache.encoders_dir),
                "threads": torch.get_num_threads(),
                "commit": self.commit,
                "decoder_steps": self.decoder_steps,
                "second_pass": dataclasses.asdict(self.engine.options.second_pass),  # apply's (protocols 2, 3)
                "position_frame": self.engine.options.adapt.position_frame,
                "tuning_precision": self.engine.options.adapt.tuning_precision,
                "register": self.engine.options.register,
                "datasets": self.args.datasets,
                "ks": self.args.ks,
                "methods": self.args.methods,
                "protocols": self.args.protocols,
                "history": self.history,
                "wall_seconds_all_invocations": time.time() - self.started
                + sum(h.get("wall_seconds") or 0 for h in self.history),
                "coverage": self.coverage(),
                "encoding_seconds": self.encoding_seconds,
                "protocol2_folds_text": self.folds_text,
                "train_sizes": self.args.train_sizes,
                "protocol3_folds": self.protocol3_folds,
                "notes": {
                    "json_nulls": "null metric = not finite: inf distance when exactly one mask is empty, "
                                  "nan Dice-in-extent when the reference lacks the structure",
                    "k_null": "k = null: prompted-SAM baselines, prompted on every reference slice, no labelled slices",
                    "hyper_parameters": "FewShotSAM defaults were chosen on CHAOS during development: CHAOS is not "
                                        "held out; hippocampus and TotalSegmentator CT are",
                },
            },
            "summaries": rows,
            "records": self.records,
            "plot": PNG_NAME if plot else None,
        }
        write_text_atomically(self.out / JSON_NAME, json.dumps(result, indent=1) + "\n")
        text = report.markdown(result, supervised)
        write_text_atomically(self.out / MD_NAME, text + "\n")
        return text

    # ----- methods ------------------------------------------------------------------------------------------------

    def encode(self, scan: Scan):
        start = time.perf_counter()
        encoded = self.engine.encode(scan.volume)
        seconds = time.perf_counter() - start
        if encoded.axis != scan.axis:
            raise RuntimeError(f"{scan.dataset} {scan.name}: engine slices along axis {encoded.axis}, "
                               f"benchmark along {scan.axis}")
        # The first encoding of a scan in this run is the one that can have cost anything; later calls read the cache.
        self.encoding_seconds.setdefault(scan.dataset, {}).setdefault(scan.name, round(seconds, 2))
        return encoded

    @contextlib.contextmanager
    def decoder_tuning(self, tuned: bool):
        """FewShotSAM (decoder tuned, the default) or its training-free variant (no decoder steps) inside."""
        options = self.engine.options.adapt
        options.decoder_steps = self.decoder_steps if tuned else 0
        try:
            yield
        finally:
            options.decoder_steps = self.decoder_steps

    def fewshotsam(self, scan: Scan, painted: np.ndarray, tuned: bool, blend: bool = True,
                   zoom: bool = True, thin: bool = True) -> np.ndarray:
        """blend=False: without the small-structure blend (FewShotSAMLib/small_structures.py); zoom=False: without
        the zoomed second look (FewShotSAMLib/zoom.py); thin=False: the blend for small structures only, not thin
        ones; to measure them."""
        options = self.engine.options
        with self.decoder_tuning(tuned):
            options.small_structures.enabled, options.zoom.enabled, options.small_structures.thin = blend, zoom, thin
            try:
                return self.engine.propagate(scan.volume, scan.label_volume(painted)).array
            finally:
                options.small_structures.enabled = options.zoom.enabled = options.small_structures.thin = True

    def adapt(self, supports: list[tuple[Scan, np.ndarray]], tuned: bool):
        """One adapter from the painted slices of the support scans, and the seconds it took."""
        with self.decoder_tuning(tuned):
            start = time.perf_counter()
            adapter = self.engine.adapt([(scan.volume, scan.label_volume(painted)) for scan, painted in supports])
            return adapter, time.perf_counter() - start

    def run_method(self, method: str, scan: Scan, painted: np.ndarray | None, encoded) -> np.ndarray:
        if method == FEWSHOTSAM:
            return self.fewshotsam(scan, painted, tuned=True)
        if method == FEWSHOTSAM_NO_TUNING:
            return self.fewshotsam(scan, painted, tuned=False)
        if method == FEWSHOTSAM_NO_BLEND:
            return self.fewshotsam(scan, painted, tuned=True, blend=False)
        if method == FEWSHOTSAM_NO_ZOOM:
            return self.fewshotsam(scan, painted, tuned=True, zoom=False)
        if method == FEWSHOTSAM_NO_THIN:
            return self.fewshotsam(scan, painted, tuned=True, thin=False)
        if method == FILL:
            from benchmarks.baselines.slicer_baselines import fill_between_slices

            return fill_between_slices(painted, scan.spacing_ijk, scan.axis)
        if method == GROW:
            from benchmarks.baselines.slicer_baselines import grow_from_seeds

            return grow_from_seeds(scan.volume.array, painted, scan.spacing_ijk, scan.axis)
        if method in (SAM_POINT, SAM_BOX):
            return prompted_sam(self.engine.model, encoded, scan.reference, list(scan.structures),
                                POINT if method == SAM_POINT else BOX)
        raise ValueError(method)

    # ----- protocols ----------------------------------------------------------------------------------------------

    def protocol1(self, dataset: str) -> None:
        args = self.args
        names = scan_names(dataset, args.data_dir, args.quick, args.hippocampus_scans, args.scans)
        ks = args.totalseg_ks if dataset == "totalseg" else args.ks
        self.plan.append(f"Planned, protocol 1, {dataset}: {len(names)} scan(s) ({', '.join(names)}); k = {ks}; "
                         f"methods: {', '.join(args.methods)}.")
        k_methods = [m for m in args.methods if m not in report.K_INDEPENDENT]
        flat_methods = [m for m in args.methods if m in report.K_INDEPENDENT]
        for number, name in enumerate(names, start=1):
            todo = [(m, None) for m in flat_methods] + [(m, k) for k in ks for m in k_methods]
            todo = [(m, k) for m, k in todo if not self.done(protocol=1, dataset=dataset, scan=name, method=m, k=k)]
            if not todo:
                log(f"[{dataset} {number}/{len(names)}] {name}: already done (--resume)")
                continue
            scan_start = time.perf_counter()
            scan = load_scan(dataset, name, args.data_dir, self.engine.options.axis)
            encoded = self.encode(scan)
            log(f"[{dataset} {number}/{len(names)}] {name}: shape {scan.volume.array.shape}, axis {scan.axis}, "
                f"structures {list(scan.structures.values())}, encoding {self.encoding_seconds[dataset][name]:.1f} s")
            painted_by_k = {k: few_shot_labels(scan.reference, scan.axis, k, list(scan.structures)) for k in ks}
            results = []
            for method, k in todo:
                painted = None if k is None else painted_by_k[k]
                start = time.perf_counter()
                prediction = self.run_method(method, scan, painted, encoded)
                seconds = time.perf_counter() - start
                record = {
                    "protocol": 1, "dataset": dataset, "scan": name, "method": method, "k": k,
                    "labelled_slices": None if k is None else labelled_count(painted, scan.axis),
                    "seconds": round(seconds, 3), "structures": score(scan, prediction),
                }
                self.add(record)
                dice = np.mean([s["dice"] for s in record["structures"].values()])
                results.append(f"{method}{'' if k is None else f' k={k}'}: {dice:.3f} ({seconds:.0f} s)")
                log(f"    {results[-1]}")
            self.write()
            log(f"[{dataset} {number}/{len(names)}] {name} done in {time.perf_counter() - scan_start:.0f} s")

    def protocol2(self) -> None:
        """CHAOS 1-shot across scans: 4 folds of 3 queries; support = the scan after the fold's queries (cyclic)."""
        args = self.args
        cases = [str(case) for case in CHAOS_CASES]
        folds = []
        for fold in range(4):
            queries = cases[3 * fold: 3 * fold + 3]
            support = cases[(3 * fold + 3) % len(cases)]
            folds.append((fold, support, queries))
        self.folds_text = ("the 12 scans in the order " + ", ".join(cases) + " form 4 folds of 3 query scans; each "
                           "fold's support is the scan right after its queries, cyclically (" +
                           "; ".join(f"support {s} -> queries {', '.join(q)}" for _, s, q in folds) +
                           "), so every scan is a query once and a support once, never both in one fold")
        methods = [m for m in ACROSS_SCANS_METHODS if m in args.methods]
        self.plan.append(f"Planned, protocol 2, chaos: 4 folds x 3 queries; methods: {', '.join(methods)}.")
        if args.scans:
            folds = [f for f in folds if any(q in args.scans for q in f[2])]
        for fold, support_name, queries in folds:
            todo = {(m, q) for m in methods for q in queries
                    if not self.done(protocol=2, dataset="chaos", scan=q, method=m)}
            if not todo:
                continue
            support = load_scan("chaos", support_name, args.data_dir, self.engine.options.axis)
            painted = support_labels(support)
            log(f"[protocol 2, fold {fold + 1}/4] support {support_name} "
                f"({labelled_count(painted, support.axis)} labelled slices), queries {', '.join(queries)}")
            self.across_scans(2, [(support, painted)], queries, todo,
                              {"k": 3, "support": support_name, "fold": fold + 1})
            self.write()

    def protocol3(self) -> None:
        """CHAOS, labelled data vs accuracy: adapted on every labelled slice of a fold's first n training scans."""
        args = self.args
        methods = [m for m in ACROSS_SCANS_METHODS if m in args.methods]
        fold_list = chaos_training_folds()
        self.protocol3_folds = [{"fold": name, "train_scans": train, "test_scans": test}
                                for name, train, test in fold_list]
        self.plan.append(f"Planned, protocol 3, chaos: {len(fold_list)} folds "
                         "(benchmarks.accuracy.datasets.chaos_training_folds); "
                         f"training scans per model {args.train_sizes}; queries "
                         f"{', '.join(args.scans) if args.scans else 'every test scan of the fold'}; "
                         f"methods: {', '.join(methods)}.")
        for fold, train_names, test_names in fold_list:
            queries = [q for q in test_names if not args.scans or q in args.scans]
            for n in args.train_sizes:
                todo = {(m, q) for m in methods for q in queries
                        if not self.done(protocol=3, dataset="chaos", scan=q, method=m, train_size=n)}
                if not todo:
                    continue
                training = [load_scan("chaos", name, args.data_dir, self.engine.options.axis)
                            for name in train_names[:n]]
                # "All slices": the full reference, so every slice holding any organ is labelled.
                supports = [(scan, scan.reference) for scan in training]
                log(f"[protocol 3, fold {fold}, {n} training scan(s): {', '.join(train_names[:n])}] "
                    f"{sum(labelled_count(p, s.axis) for s, p in supports)} labelled slices, "
                    f"queries {', '.join(queries)}")
                self.across_scans(3, supports, test_names, todo,
                                  {"k": None, "fold": fold, "train_scans": train_names[:n], "train_size": n})
                self.write()

    def across_scans(self, protocol: int, supports: list[tuple[Scan, np.ndarray]], queries: list[str],
                     todo: set[tuple[str, str]], fields: dict) -> None:
        """Adapt once per method on the supports, segment the unlabelled queries in ``todo``, record each.

        ``queries``: the fold's query scans, which share the adaptation time (one adapter serves them all);
        ``fields``: the protocol's own record fields (k, fold, support or training scans).
        """
        for scan, _ in supports:
            self.encode(scan)
        labelled = sum(labelled_count(painted, scan.axis) for scan, painted in supports)
        query_scans = {}
        for method in ACROSS_SCANS_METHODS:
            mine = [q for q in queries if (method, q) in todo]
            if not mine:
                continue
            adapter, adapt_seconds = self.adapt(supports, tuned=method == FEWSHOTSAM)
            for query in mine:
                if query not in query_scans:
                    query_scans[query] = load_scan("chaos", query, self.args.data_dir, self.engine.options.axis)
                scan = query_scans[query]
                self.encode(scan)
                registration = []  # what apply said about registering the support to this query (--register on)
                said = Progress(registration_listener(registration))
                start = time.perf_counter()
                prediction = self.engine.apply(adapter, scan.volume, said).array
                seconds = time.perf_counter() - start
                record = {
                    "protocol": protocol, "dataset": "chaos", "scan": query, "method": method, **fields,
                    "labelled_slices": labelled,
                    "seconds": round(seconds + adapt_seconds / len(queries), 3),
                    "adapt_seconds": round(adapt_seconds, 3), "apply_seconds": round(seconds, 3),
                    "structures": score(scan, prediction),
                }
                if registration:
                    record["registration"] = registration[-1]
                    log(f"    {registration[-1]}")
                self.add(record)
                extent = np.mean([s["dice_inside_reference_extent"] for s in record["structures"].values()])
                whole = np.mean([s["dice"] for s in record["structures"].values()])
                log(f"    {method}: query {query}: Dice in extent {extent:.3f}, whole volume {whole:.3f} "
                    f"(adapt {adapt_seconds:.0f} s, apply {seconds:.0f} s)")

    def run(self) -> str:
        try:
            for dataset in self.args.datasets:
                if 1 in self.args.protocols:
                    self.protocol1(dataset)
                if dataset == "chaos" and 2 in self.args.protocols and not self.args.quick:
                    self.protocol2()
                if dataset == "chaos" and 3 in self.args.protocols and not self.args.quick:
                    self.protocol3()
            self.status = "complete"
        except KeyboardInterrupt:
            self.status = "partial: interrupted"
            log("interrupted: writing partial results")
        return self.write()


def registration_listener(messages: list[str]):
    """A progress callback that keeps the final message of apply's registration stage in `messages`."""

    def listen(event) -> None:
        if event.stage == REGISTER_STAGE and event.done == event.total:
            messages.append(event.message)

    return listen


def support_labels(scan: Scan) -> np.ndarray:
    """Protocol 2's support: for each organ, the slices at 1/6, 1/2, 5/6 of its extent, each fully labelled."""
    chosen = set()
    for value in scan.structures:
        chosen.update(fractions_of_extent(scan.reference == value, scan.axis, PROTOCOL2_FRACTIONS))
    painted = np.zeros_like(scan.reference)
    index = [slice(None)] * 3
    index[scan.axis] = sorted(chosen)
    painted[tuple(index)] = scan.reference[tuple(index)]
    return painted


def rewrite_report(out: Path) -> str:
    """Re-render accuracy.md and the plot from an existing accuracy.json (e.g. after a report template change)."""
    result = json.loads((out / JSON_NAME).read_text())
    result["summaries"] = report.summaries(result["records"])
    supervised = report.load_supervised(out)
    plot = report.plot_dice_vs_k(result["summaries"], out / PNG_NAME, supervised)
    result["plot"] = PNG_NAME if plot else None
    write_text_atomically(out / JSON_NAME, json.dumps(result, indent=1) + "\n")
    text = report.markdown(result, supervised)
    write_text_atomically(out / MD_NAME, text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        print(rewrite_report(Path(args.out)))
        return 0
    torch.set_num_threads(max(1, args.threads))
    if not args.data_dir.is_dir():
        log(f"data folder {args.data_dir} not found; pass --data-dir or set FEWSHOTSAM_DATA")
        return 2
    benchmark = Benchmark(args)
    text = benchmark.run()
    print(text)
    log(f"wrote {args.out / JSON_NAME}, {args.out / MD_NAME}, {args.out / PNG_NAME} "
        f"in {(time.time() - benchmark.started) / 60:.1f} min")
    return 0 if benchmark.status == "complete" else 130


if __name__ == "__main__":
    sys.exit(main())
