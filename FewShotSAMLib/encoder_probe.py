"""`--encoder auto` on CPU: the fastest encoder path this computer can run, measured once, not guessed from a list.

Which path wins depends on the CPU (bf16 or AMX instructions, AVX-512 or only AVX2, cores, caches) and on the
library versions: on a Zen 4 the compiled bf16 encoder runs at 4.4x eager fp32 where ONNX Runtime reaches 2x, on a
Zen 3 (no bf16) OpenVINO and ONNX Runtime are close. So on first use each candidate path is built and loaded (a path
that fails to build or run here, for lack of a compiler, a library or an instruction, is recorded and never picked),
then timed on one synthetic slice in interleaved rounds (the fastest round of each: a busy machine slows rounds,
it never speeds one up). The ranking is kept in the cache's `.encoders/` folder in a small JSON file, keyed by the
CPU's model and flags, the thread count and the library versions, so that a new CPU or an upgrade measures again.
The probe itself costs a few seconds (2 timed rounds of one slice per path, after one warm-up call each).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import torch
from filelock import FileLock

from .atomic_write import write_text_atomically
from .errors import one_line

PROBE_ROUNDS = 2
PROBED_LIBRARIES = ("torch", "onnxruntime", "openvino")


def cpuinfo_fields() -> dict[str, str] | None:
    """The first processor's block of /proc/cpuinfo as {key: value} (it describes them all); None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_description() -> str:
    """The CPU's model name and its instruction-set flags (Linux: /proc/cpuinfo; elsewhere what Python can tell)."""
    fields = cpuinfo_fields()
    if fields is None:
        return f"{platform.machine()} {platform.processor()}".strip()
    flags = fields.get("flags", fields.get("Features", ""))
    return f"{fields.get('model name', platform.processor())} | {flags}"


def cpu_fingerprint() -> str:
    """A short hash of the CPU model and flags: built code and probe results are reused only on the same CPU."""
    return hashlib.sha256(cpu_description().encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    versions = {}
    for name in PROBED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def probe_record_file(model, folder: Path) -> Path:
    """Where this machine's measured ranking lives, one per weights, CPU, thread count and library versions."""
    identity = json.dumps([cpu_description(), torch.get_num_threads(), library_versions()])
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(folder) / f"auto-{model.weights_id.replace(':', '-')}-{model.spec.input_size}px-{key}.json"


def ranked_paths(model, folder: Path, candidates: tuple[str, ...], open_path) -> list[str]:
    """The candidate paths that work here, fastest first: read from the probe record, or measured now (under a lock,
    so that two processes do not probe at once). open_path(path) builds and loads a path's encoder (a callable on
    normalised [1, 3, S, S] images) or raises."""
    record_file = probe_record_file(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / f".{record_file.name}.lock"):
        record = _read_record(record_file)
        if record is None or not set(candidates) <= set(record["ranking"]) | set(record["failed"]):
            record = probe(model, candidates, open_path)
            write_text_atomically(record_file, json.dumps(record, indent=2))
    return [path for path in record["ranking"] if path in candidates]


def _read_record(record_file: Path) -> dict | None:
    """A probe record, or None when absent or unreadable (it is measured again then)."""
    try:
        record = json.loads(record_file.read_text())
        return record if isinstance(record.get("ranking"), list) and isinstance(record.get("failed"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def probe(model, candidates: tuple[str, ...], open_path) -> dict:
    """Build and time each candidate; the record of what ran, how fast, and why the others did not."""
    size = model.spec.input_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    image = ((image - model.pixel_mean.cpu()) / model.pixel_std.cpu()).contiguous(memory_format=torch.channels_last)
    runners, failed, build_s = {}, {}, {}
    for path in candidates:
        start = time.perf_counter()
        try:
            runner = open_path(path)
            runner(image)  # warm-up: first-call allocations and kernel selection, and proof that it runs
            runners[path] = runner
        except Exception as error:  # any failure to build or run means this path is not for this machine
            failed[path] = one_line(error, 300)
        build_s[path] = round(time.perf_counter() - start, 2)
    best = {path: float("inf") for path in runners}
    for _ in range(PROBE_ROUNDS):
        for path, runner in runners.items():
            start = time.perf_counter()
            runner(image)
            best[path] = min(best[path], time.perf_counter() - start)
    ranking = sorted(best, key=best.get)
    return {"cpu": cpu_description(), "threads": torch.get_num_threads(), "libraries": library_versions(),
            "ranking": ranking, "seconds_per_slice": {path: round(best[path], 4) for path in ranking},
            "failed": failed, "build_and_warm_up_s": build_s}
