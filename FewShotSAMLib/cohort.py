"""Apply an adapted model (.fsam) to a cohort: thousands of scans on a Dask cluster, resumable, with a per-scan report.

    summary = apply_cohort("abdomen.fsam", ["archive/**/*.nii.gz"], "results/", workers=4)

Each scan is one Dask task running the same Engine.apply as `fewshotsam apply`, so the outputs are the same files.
A worker loads the model once (a worker plugin fills a per-process cache when the worker starts, and again when a
dead worker is replaced). A scan whose output exists is skipped (outputs are written atomically, so an existing
one is complete) unless overwrite=True. A scan that fails becomes a failed row and the others go on; a scan whose
worker dies (out of memory, killed machine) is moved to another worker by Dask, at most `retries` times.
results/summary.csv has one row per scan (see cohort_report); it is rewritten as scans finish, so an interrupted
run leaves the rows it finished, and a rerun picks up where it stopped.

Scans, the model and the output folder must be reachable at the same paths from every worker (a shared file
system); the embedding cache is each worker's own unless EngineOptions.cache_dir names a shared folder.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .adapter import FewShotAdapter
from .cohort_inputs import find_scans, output_paths
from .cohort_report import (
    CohortSummary,
    column_name,
    flag_rows,
    measure_result_file,
    measure_structures,
    read_summary_csv,
    row_for,
    summary_columns,
    write_summary_csv,
)
from .errors import FewShotSAMError
from .orientation import to_slices
from .pipeline import Engine, EngineOptions
from .propagation import coarse_probabilities
from .volume import LabelVolume, Volume
from .volume_io import check_output_path, read_volume, write_segmentation

SUMMARY_NAME = "summary.csv"
DEFAULT_RETRIES = 2  # times a scan moves to another worker after its worker died
SUMMARY_EVERY_S = 30.0  # how often the summary is rewritten during a run


@dataclass(frozen=True)
class ScanJob:
    image: Path
    output: Path


# ----------------------------------------------------------------------------------------------------------------
# On a worker (or in this process): one scan


_loaded: dict = {}  # this process's model: {key: (engine, adapter)}, one entry


def loaded_model(model_path: str, options: EngineOptions) -> tuple[Engine, FewShotAdapter]:
    """The engine and adapter for this model and options, loaded once per process."""
    key = (str(Path(model_path).resolve()), repr(options))
    if key not in _loaded:
        _loaded.clear()  # one model per worker: a new one replaces the old
        adapter = FewShotAdapter.load(model_path)
        engine = Engine(options)
        adapter.check_model(engine.model, model_path)
        _loaded[key] = (engine, adapter)
    return _loaded[key]


def segment_scan(job: ScanJob, model_path: str, options: EngineOptions, overwrite: bool) -> dict:
    """Segment one scan and measure it; never raises for a bad scan: the row says what went wrong."""
    start = time.perf_counter()
    segments = None
    try:
        engine, adapter = loaded_model(model_path, options)
        segments = adapter.segments
        if job.output.exists() and not overwrite:
            measures = measure_result_file(job.output, segments, options.axis)
            return row_for(job.image, job.output, "skipped", "", time.perf_counter() - start, segments, measures)
        check_output_path(job.output, overwrite)
        volume = read_volume(job.image)
        result = engine.apply(adapter, volume)
        confidences = structure_confidences(engine, adapter, volume, result)
        write_segmentation(job.output, result, overwrite)
        measures = measure_structures(result, engine.slice_axis(volume), segments, confidences)
        return row_for(job.image, job.output, "ok", "", time.perf_counter() - start, segments, measures)
    except FewShotSAMError as error:
        message = str(error)
    except MemoryError:
        message = f"out of memory while segmenting {job.image}"
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop a cohort
        last = traceback.extract_tb(error.__traceback__)[-1]
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        message = f"{job.image}: {type(error).__name__}: {first_line} (at {Path(last.filename).name}:{last.lineno})"
    return row_for(job.image, job.output, "failed", message, time.perf_counter() - start, segments or [], None)


def structure_confidences(engine: Engine, adapter: FewShotAdapter, volume: Volume,
                          result: LabelVolume) -> dict[int, float | None]:
    """Per structure, the mean over the slices holding it of the pixel prompts' mean probability for it on that
    slice's embedding cells inside the segmented region: low when the scan looks unlike the labelled ones.
    The embeddings come from the cache Engine.apply just filled, so this costs the small classifier only."""
    axis = engine.slice_axis(volume)
    n_slices = volume.array.shape[axis]
    encoded = engine.encode(volume, only=engine.slices_to_encode([], n_slices))
    probabilities = coarse_probabilities(adapter, encoded).numpy()  # [n, K, h, w]
    labels = to_slices(result.array, axis)
    rows, cols = labels.shape[1:]
    # The model sees each slice resized (longest side) into the top-left of a padded square of embedding cells.
    resize, grid = encoded.resize, probabilities.shape[-1]
    cell_rows = np.minimum((np.arange(rows) * resize.resized_shape[0] / rows * grid / resize.target).astype(int),
                           grid - 1)
    cell_cols = np.minimum((np.arange(cols) * resize.resized_shape[1] / cols * grid / resize.target).astype(int),
                           grid - 1)
    confidences = {}
    for class_index, value in enumerate(adapter.label_values, start=1):
        per_slice = []
        for z in np.flatnonzero((labels == value).any(axis=(1, 2))):
            pixels = np.nonzero(labels[z] == value)
            per_slice.append(float(probabilities[z, class_index][cell_rows[pixels[0]], cell_cols[pixels[1]]].mean()))
        confidences[value] = float(np.mean(per_slice)) if per_slice else None
    return confidences


# ----------------------------------------------------------------------------------------------------------------
# The run


def apply_cohort(model_path, inputs: list[str], out_dir, options: EngineOptions | None = None, *,
                 overwrite: bool = False, suffix: str = ".seg.nrrd", workers: int | None = None,
                 scheduler=None, retries: int = DEFAULT_RETRIES,
                 on_scan: Callable[[int, int, dict], None] | None = None,
                 on_cluster: Callable[[object], None] | None = None) -> CohortSummary:
    """Segment every scan named by `inputs` (files, globs, folders, DICOM series folders, .txt/.csv lists) and
    return the summary table, also written to <out_dir>/summary.csv.

    scheduler: a Dask scheduler address ('tcp://host:8786') or a distributed.Client; else workers: a LocalCluster
    of that many worker processes on this machine (None: default_workers()); workers=0 runs in this process
    without Dask. on_scan(done, total, row) is called as each scan finishes; on_cluster(client) once connected.
    """
    options = options or EngineOptions()
    out_dir = Path(out_dir)
    adapter = FewShotAdapter.load(model_path)  # a bad model file stops here, before any cluster starts
    scans = find_scans(inputs, exclude=out_dir)
    if not scans:
        raise FewShotSAMError("no scan to segment")
    jobs = [ScanJob(scan, output) for scan, output in zip(scans, output_paths(scans, out_dir, suffix))]
    for folder in sorted({job.output.parent for job in jobs}):
        folder.mkdir(parents=True, exist_ok=True)
    columns = summary_columns(adapter.segments)
    summary = CohortSummary(columns, [], out_dir / SUMMARY_NAME)
    arguments = (str(Path(model_path).resolve()), options, overwrite)
    rows: list[dict | None] = [None] * len(jobs)
    last_written = time.monotonic()
    earlier = earlier_confidences(summary.csv_path, adapter.segments)

    def finished(index: int, row: dict) -> None:
        nonlocal last_written
        if row["status"] == "skipped":  # its confidence was measured when it was made: keep it
            row.update(earlier.get(row["output"], {}))
        rows[index] = row
        done = sum(row is not None for row in rows)
        if on_scan is not None:
            on_scan(done, len(jobs), row)
        if time.monotonic() - last_written > SUMMARY_EVERY_S:
            write_summary_csv(summary.csv_path, columns, [row for row in rows if row is not None])
            last_written = time.monotonic()

    try:
        if workers == 0 and scheduler is None:
            for index, job in enumerate(jobs):
                finished(index, segment_scan(job, *arguments))
        else:
            run_on_dask(jobs, arguments, finished, scheduler, workers, retries, on_cluster)
    finally:
        summary.rows = [row for row in rows if row is not None]
        flag_rows(summary.rows, adapter.segments)
        write_summary_csv(summary.csv_path, columns, summary.rows)
    summary.counts = {status: len(summary.rows_with(status)) for status in ("ok", "skipped", "failed")}
    return summary


def earlier_confidences(csv_path: Path, segments) -> dict[str, dict]:
    """{output: {confidence column: value}} from an earlier run's summary (a skipped scan's file has none)."""
    if not csv_path.is_file():
        return {}
    columns = [column_name(segment, "confidence") for segment in segments]
    try:
        rows = read_summary_csv(csv_path)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return {row["output"]: {column: float(row[column]) for column in columns if row.get(column)}
            for row in rows if row.get("output") and row.get("status") in ("ok", "skipped")}


def default_workers() -> int:
    """Worker processes for a LocalCluster: about one per two cores (two threads each), at least 2, at most 8
    (each holds the model and a scan's working memory: about 1-3 GB for a 512x512x300 CT)."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def run_on_dask(jobs: list[ScanJob], arguments: tuple, finished, scheduler, workers: int | None, retries: int,
                on_cluster) -> None:
    if not dask_available():
        raise FewShotSAMError("a cohort on Dask needs dask.distributed: pip install 'fewshotsam[cohort]' "
                              "(or --workers 0 to segment the scans in this process)")
    from distributed import as_completed

    with dask_client(scheduler, workers, retries) as (client, torch_threads):
        if on_cluster is not None:
            on_cluster(client)
        model_path, options, overwrite = arguments
        if scheduler is None or workers_on_this_machine(client):
            options = with_encoder_chosen_here(options)
            arguments = (model_path, options, overwrite)
        from .cohort_plugin import ModelPlugin

        client.register_plugin(ModelPlugin(model_path, options, torch_threads), name=ModelPlugin.name)
        run = uuid.uuid4().hex[:8]  # keys unique to this run: a rerun on the same cluster must run again
        futures = {client.submit(segment_scan, job, *arguments, key=f"fewshotsam-{run}-{index}-{job.image.name}",
                                 pure=False): index for index, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                finished(index, collect(future, jobs[index], arguments, retries))
        except BaseException:  # Ctrl-C or an error here: stop the scans still queued or running
            client.cancel(list(futures))
            raise


def workers_on_this_machine(client) -> bool:
    """Whether every worker of this client's cluster runs on this machine (a LocalCluster, or a scheduler whose
    workers listen on a loopback address or this host's)."""
    import socket
    from urllib.parse import urlparse

    local = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        local.add(socket.gethostbyname(socket.gethostname()))
    addresses = list(client.scheduler_info().get("workers", {}))
    return bool(addresses) and all(urlparse(address).hostname in local for address in addresses)


def with_encoder_chosen_here(options: EngineOptions) -> EngineOptions:
    """The options with the encoder path that `auto` picks in this process, for worker processes on this machine.

    `auto` measures the paths once per thread count (encoder_probe), and a LocalCluster's workers run PyTorch on
    fewer threads than this process: each would pick for itself, perhaps another path (measured on a 2-core Xeon:
    the compiled bf16 encoder on one thread, OpenVINO on two), so the outputs would depend on the number of workers
    and would not reuse the embeddings a single-process run cached. One path for the whole cohort keeps them equal.
    """
    if options.encoder != "auto":
        return options
    engine = Engine(options)
    path = engine.model.prepare_encoder("auto", engine.cache.encoders_dir)
    engine.model.release_encoder_sessions()
    return replace(options, encoder=path)


def collect(future, job: ScanJob, arguments: tuple, retries: int) -> dict:
    """The future's row; a scan whose workers kept dying is a failed row saying so."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        error = (f"{job.image}: the worker segmenting it died {retries + 1} times (out of memory, or killed); "
                 f"it was not retried again")
    except Exception as error:  # noqa: BLE001 - e.g. a worker that could not unpickle the task
        error = f"{job.image}: {type(error).__name__}: {error}"
    return row_for(job.image, job.output, "failed", error, 0.0, [], None)


@contextlib.contextmanager
def dask_client(scheduler, workers: int | None, retries: int):
    """(client, torch threads per worker): connected to `scheduler`, or to a new LocalCluster of `workers`
    single-threaded worker processes, each running PyTorch on its share of the cores."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        if isinstance(scheduler, Client):
            yield scheduler, None
            return
        # The scheduler's own configuration (distributed.scheduler.allowed-failures) bounds the retries there.
        with Client(scheduler) as client:
            yield client, None
        return
    workers = workers or default_workers()
    torch_threads = max(1, (os.cpu_count() or 1) // workers)
    # The scheduler runs in this process, so this setting bounds how often a scan moves after its worker died.
    with environment_kept(), dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                yield client, torch_threads
        finally:
            cluster.close()


@contextlib.contextmanager
def environment_kept():
    """Leave this process's environment as it was: Dask's nanny sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) in
    the process that starts a LocalCluster, so every program started from it afterwards (the Slicer module's worker,
    a benchmark's command line) would run PyTorch on one thread (measured: the Slicer tests ran 2x slower after the
    cohort tests)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def dashboard_line(client) -> str:
    """What to print about Dask's dashboard for this client."""
    import importlib.util

    link = getattr(client, "dashboard_link", None)
    if importlib.util.find_spec("bokeh") is None:
        return "Dask dashboard: not available (pip install 'bokeh>=3.1' to watch the cluster in a browser)"
    return f"Dask dashboard: {link}"


def dask_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("distributed") is not None
