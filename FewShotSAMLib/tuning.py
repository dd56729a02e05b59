"""Decoder-only tuning on the few-shot collection; the image encoder never trains (its embeddings are cached)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F

from . import catalog
from .compiled_encoder import cpu_has_bf16
from .decoder import decode_in_windows
from .errors import FewShotSAMError
from .fewshot import IGNORE, FewShotCollection
from .models import SamModel
from .progress import NO_PROGRESS, Progress
from .queries import jitter_boxes, mask_boxes, query_tokens

TUNING_PRECISIONS = catalog.values(catalog.TUNING_PRECISIONS)


def tuning_autocast(precision: str, device: torch.device):
    """The context the decoder's forward passes run in while tuning (the loss, the gradients' accumulation into the
    weights and the optimiser stay fp32). "auto": bf16 autocast on a CPU with bf16 instructions (AMD Zen 4/5, Intel
    Xeons since Cooper Lake), where the 16 steps of a CHAOS adaptation took 20-30% less time with the same Dice
    (benchmarks/results/tuning-precision.md); fp32 elsewhere: without those instructions bf16 is emulated and
    slower, and on a GPU fp32 is what was measured. Not the default (AdaptOptions.tuning_precision says why)."""
    if precision not in TUNING_PRECISIONS:
        raise FewShotSAMError(f"unknown tuning precision {precision!r}: choose one of {', '.join(TUNING_PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cpu" and cpu_has_bf16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _training_queries(collection: FewShotCollection):
    """All (labelled slice, structure present on it) pairs with their targets' boxes, slice-major. One numpy pass
    per structure over every slice: a torch call per pair cost up to a second on a process's first tuning."""
    targets = collection.targets.numpy()
    slices, classes, boxes = [], [], []
    for class_index in range(1, collection.n_classes):
        present, class_boxes = mask_boxes(targets == class_index)
        slices.append(present)
        classes.append(np.full(len(present), class_index))
        boxes.append(class_boxes)
    slices, classes, boxes = (np.concatenate(parts) if parts else np.zeros(0) for parts in (slices, classes, boxes))
    order = np.lexsort((classes, slices))
    return (torch.from_numpy(slices[order]).long(), torch.from_numpy(classes[order]).long(),
            torch.from_numpy(boxes[order].reshape(-1, 4)).float())


def cpu_state(module: torch.nn.Module) -> dict:
    """A copy of a module's weights on the CPU, wherever it runs: what adapters keep and save (a .fsam made on a
    GPU loads anywhere)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits) * valid
    target = target * valid
    intersection = (probability * target).sum(dim=(1, 2))
    union = probability.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    return (1 - (2 * intersection + 1) / (union + 1)).mean()


def tune_decoder(model: SamModel, collection: FewShotCollection, tokens: torch.Tensor, steps: int = 16,
                 batch_size: int = 4, learning_rate: float = 1e-4, seed: int = 0,
                 progress: Progress = NO_PROGRESS, start_state: dict | None = None,
                 focus: list[int] | None = None,
                 precision: str = catalog.DEFAULT_TUNING_PRECISION) -> dict:
    """Fine-tune a copy of the mask decoder; returns its state dict (the model itself is left untouched).

    start_state: tune on from these decoder weights (a warm start) instead of the pretrained ones.
    focus: draw the training queries only from these labelled slices (indices into the collection).
    precision: of the decoder's forward passes (tuning_autocast)."""
    forward_precision = tuning_autocast(precision, model.device)
    slices, classes, boxes = _training_queries(collection)
    if focus is not None:
        chosen = torch.isin(slices, torch.tensor(focus, dtype=slices.dtype))
        slices, classes, boxes = slices[chosen], classes[chosen], boxes[chosen]
    original = copy.deepcopy(model.mask_decoder.state_dict())
    if start_state is not None:
        model.mask_decoder.load_state_dict(start_state)
    if steps <= 0 or len(slices) == 0:
        tuned = cpu_state(model.mask_decoder)
        model.mask_decoder.load_state_dict(original)
        return tuned
    generator = torch.Generator().manual_seed(seed)
    size = collection.targets.shape[-1]
    decoder, device = model.mask_decoder, model.device
    decoder.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps, pct_start=0.15)
    torch.manual_seed(seed)
    try:
        for step in range(steps):
            pick = torch.randint(len(slices), (min(batch_size, len(slices)),), generator=generator)
            # The collection stays on the CPU; each step's batch goes to the decoder's device.
            query_boxes = jitter_boxes(boxes[pick], size, generator).to(device)
            query = query_tokens(model, query_boxes, tokens[classes[pick] - 1].to(device))
            embeddings = collection.embeddings[slices[pick]].to(device)
            order, parts = [], []
            with forward_precision:
                for indices, window_logits in decode_in_windows(model, embeddings.__getitem__, query, query_boxes,
                                                                len(pick)):
                    order += indices
                    parts.append(window_logits)
            logits = torch.cat(parts).float()[torch.argsort(torch.tensor(order, device=device))]
            # The loss is taken at the decoder's native resolution (256 px for every model): subsampling the
            # targets is far cheaper than upsampling logits to SAM's 1024 px input.
            stride = size // logits.shape[-1]
            targets = collection.targets[slices[pick]][:, ::stride, ::stride].to(device)
            valid = (targets != IGNORE).float()
            target = (targets == classes[pick].to(device)[:, None, None]).float()
            bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / valid.sum()
            loss = bce + dice_loss(logits, target, valid)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            progress.update("tune", step + 1, steps, f"tuning the mask decoder (step {step + 1}/{steps})")
        tuned = cpu_state(decoder)
    finally:
        decoder.load_state_dict(original)
        decoder.eval().requires_grad_(False)
    return tuned
