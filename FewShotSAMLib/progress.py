"""Progress reporting and cancellation shared by the CLI, the Slicer worker and the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import Cancelled

# Share of a whole run each stage takes, so one overall fraction can drive a single progress bar.
# "second pass": apply's self-training on the query (second_pass.py), its own prompts, tuning and propagation.
# "register": apply's registration of the model's support scan to the query (registration.py).
# "reach": propagate's encoding on demand after tuning, of the slices the structures reach (Engine.encode_reach).
# "zoom": propagate's second look at structures too small for the embedding grid, on crops around them (zoom.py);
# small, because most runs have none and their bar should not jump to the end from far before it.
STAGE_WEIGHTS = {"load": 0.02, "encode": 0.3, "register": 0.02, "prompts": 0.05, "tune": 0.2, "reach": 0.25,
                 "propagate": 0.16, "zoom": 0.03, "second pass": 0.1, "write": 0.02}
APPLY_STAGES = tuple(STAGE_WEIGHTS)  # the default: a stage missing from the list would report fraction 0
RUN_STAGES = tuple(stage for stage in STAGE_WEIGHTS if stage != "second pass")  # propagate, adapt, demo
ZOOM_STAGES = ("encode", "prompts", "tune", "reach", "propagate")  # a zoomed structure's own propagate


@dataclass
class ProgressEvent:
    stage: str
    done: int
    total: int
    fraction: float  # overall, 0..1
    message: str


class Progress:
    """Turns per-stage counts into overall fractions, forwards them to a callback and checks for cancel."""

    def __init__(self, callback: Callable[[ProgressEvent], None] | None = None,
                 cancel: Callable[[], bool] | None = None, stages: tuple[str, ...] = APPLY_STAGES):
        self.callback = callback
        self.cancel = cancel
        weights = [STAGE_WEIGHTS.get(stage, 0.1) for stage in stages]
        total = sum(weights)
        self._start = {}
        self._weight = {}
        position = 0.0
        for stage, weight in zip(stages, weights):
            self._start[stage] = position / total
            self._weight[stage] = weight / total
            position += weight

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.check_cancel()
        if self.callback is None:
            return
        within = done / total if total else 1.0
        fraction = self._start.get(stage, 0.0) + self._weight.get(stage, 0.0) * within
        self.callback(ProgressEvent(stage, done, total, min(1.0, fraction), message or stage))


class WithinStage(Progress):
    """Reports a nested job's stages (e.g. prompts, tune, propagate) as one stage of the outer progress, so that
    the overall fraction keeps moving forward while the nested job repeats stages the outer run has passed.
    part, parts: the nested job is part `part` (from 0) of `parts` equal ones within the stage (zoom: one a
    structure). Its messages are prefixed with the stage (and the part, when there are several)."""

    STEPS = 1000

    def __init__(self, outer: Progress, stage: str, stages: tuple[str, ...], part: int = 0, parts: int = 1):
        super().__init__(callback=self._forward, stages=stages)
        self.outer, self.stage, self.part, self.parts = outer, stage, part, parts

    def check_cancel(self) -> None:
        self.outer.check_cancel()

    def _forward(self, event: ProgressEvent) -> None:
        done = round((self.part + event.fraction) / self.parts * self.STEPS)
        of = f" {self.part + 1}/{self.parts}" if self.parts > 1 else ""
        message = f"{self.stage}{of}: {event.message}"  # the nested job's own messages would repeat earlier stages
        self.outer.update(self.stage, done, self.STEPS, message)


class AsStage(Progress):
    """Reports a job's updates (whatever stage it names) as one stage of the outer progress, counted on from
    `done_before` out of `total`: the slices encoded on demand after tuning report as "reach", so that the bar does
    not move back to the encode stage."""

    def __init__(self, outer: Progress, stage: str, done_before: int, total: int, message: str):
        super().__init__(cancel=outer.cancel)
        self.outer, self.stage, self.done_before, self.total, self.message = outer, stage, done_before, total, message

    def check_cancel(self) -> None:
        self.outer.check_cancel()

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        done = min(self.done_before + done, self.total)
        self.outer.update(self.stage, done, self.total, f"{self.message} ({done} of at most {self.total})")


NO_PROGRESS = Progress()
