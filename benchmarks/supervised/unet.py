"""A MONAI 2D U-Net on axial slices: slice preparation, wall-time-bounded training, slice-by-slice prediction.

Slices are cut with ``FewShotSAMLib.orientation.to_slices`` along the benchmark's slice axis, normalised per scan,
resized to ``size`` x ``size`` for the network and predicted back on the scan's own grid (class probabilities are
resized, then the arg-max is taken, so the output needs no label resampling).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from FewShotSAMLib.orientation import from_slices, to_slices

CHANNELS = (16, 32, 64, 128, 256)
STRIDES = (2, 2, 2, 2)
RESIDUAL_UNITS = 2
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
PERCENTILES = (0.5, 99.5)
SCALE_JITTER = (0.85, 1.15)  # zoom about the slice centre; no flips or large rotations: left/right kidney are classes
# Intensity ranges are nnU-Net's defaults: T2 organ brightness varies between patients (CHAOS scan 15 has a liver
# and spleen far darker than the others), and per-scan normalisation alone does not remove that.
GAMMA_JITTER = (0.7, 1.5)
CONTRAST_JITTER = (0.75, 1.25)  # about each slice's mean
BRIGHTNESS_JITTER = (0.75, 1.25)  # multiplicative
PREDICT_BATCH = 16

SETTINGS_TEXT = {
    "network": f"monai.networks.nets.UNet(spatial_dims=2, channels={CHANNELS}, strides={STRIDES}, "
               f"num_res_units={RESIDUAL_UNITS}), instance norm (MONAI default), trained from scratch",
    "loss": "monai.losses.DiceCELoss(softmax, one-hot labels, batch Dice), background included",
    "optimiser": f"AdamW lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}; lr decays as (1 - t/T)^0.9 over the "
                 f"wall-time budget T (nnU-Net's poly schedule, by time instead of epochs)",
    "normalisation": f"per scan: clip to the {PERCENTILES[0]} and {PERCENTILES[1]} percentiles, map to [0, 1]",
    "augmentation": f"every sample: scale jitter {SCALE_JITTER} about the slice centre, gamma {GAMMA_JITTER}, "
                    f"contrast {CONTRAST_JITTER} about the slice mean, brightness x{BRIGHTNESS_JITTER} (nnU-Net's "
                    f"intensity ranges); no flips or rotations (left/right kidney are separate classes)",
    "sampling": "every slice of the training scans (with and without organs), shuffled each epoch",
    "post_processing": "none (arg-max of the probabilities resized to the scan's grid)",
}


def normalise(image: np.ndarray) -> np.ndarray:
    """MR intensities have no fixed unit, so each scan is scaled by its own distribution (as nnU-Net does for MR)."""
    low, high = np.percentile(image, PERCENTILES)
    return np.clip((image - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)


def image_slices(image: np.ndarray, axis: int, size: int) -> torch.Tensor:
    """[n, 1, size, size] float32 network input from a [k, j, i] scan."""
    stack = np.ascontiguousarray(to_slices(normalise(image), axis))
    x = torch.from_numpy(stack)[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def label_slices(classes: np.ndarray, axis: int, size: int) -> torch.Tensor:
    """[n, 1, size, size] int64 class indices (nearest neighbour: labels must not be blended)."""
    stack = np.ascontiguousarray(to_slices(classes, axis)).astype(np.float32)
    y = F.interpolate(torch.from_numpy(stack)[:, None], size=(size, size), mode="nearest-exact")
    return y.long()


def build_unet(num_classes: int) -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=CHANNELS, strides=STRIDES,
                num_res_units=RESIDUAL_UNITS)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and intensity jitter of a batch; the same zoom for image and labels."""
    n = x.shape[0]
    inverse_scale = 1.0 / _uniform(n, *SCALE_JITTER, generator)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([inverse_scale, zero, zero], 1), torch.stack([zero, inverse_scale, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    gamma = torch.exp(_uniform(n, math.log(GAMMA_JITTER[0]), math.log(GAMMA_JITTER[1]), generator)).view(n, 1, 1, 1)
    contrast = _uniform(n, *CONTRAST_JITTER, generator).view(n, 1, 1, 1)
    brightness = _uniform(n, *BRIGHTNESS_JITTER, generator).view(n, 1, 1, 1)
    x = x.clamp(0.0, 1.0) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean) * brightness, y


@dataclass
class Training:
    seconds: float
    steps: int
    epochs: float
    final_loss: float  # mean of the last 50 steps' training loss


def train(x: torch.Tensor, y: torch.Tensor, num_classes: int, minutes: float, batch_size: int, seed: int,
          log: Callable[[str], None] = lambda message: None) -> tuple[UNet, Training]:
    """Train until ``minutes`` of wall time have passed (checked before each step)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_unet(num_classes)
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    budget = minutes * 60.0
    order: list[int] = []
    losses: list[float] = []
    steps = 0
    start = last_log = time.perf_counter()
    net.train()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimiser.param_groups:
            group["lr"] = LEARNING_RATE * (1.0 - elapsed / budget) ** 0.9
        if len(order) < batch_size:  # a fresh shuffle of every slice once the previous one is used up
            order += torch.randperm(len(x), generator=generator).tolist()
        index, order = order[:batch_size], order[batch_size:]
        xb, yb = augment(x[index], y[index], generator)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_function(net(xb), yb)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        steps += 1
        if time.perf_counter() - last_log > 60:
            last_log = time.perf_counter()
            log(f"    {elapsed / 60:5.1f} min: step {steps}, epoch {steps * batch_size / len(x):.1f}, "
                f"loss {np.mean(losses[-50:]):.3f}")
    seconds = time.perf_counter() - start
    net.eval()
    final_loss = float(np.mean(losses[-50:])) if losses else math.nan
    return net, Training(seconds, steps, steps * batch_size / len(x), final_loss)


@torch.no_grad()
def predict(net: UNet, image: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Class indices on the scan's own [k, j, i] grid, one slice batch at a time."""
    net.eval()
    x = image_slices(image, axis, size)
    rows, cols = to_slices(image, axis).shape[1:]
    classes = []
    for batch in x.split(PREDICT_BATCH):
        probabilities = torch.softmax(net(batch), dim=1)
        probabilities = F.interpolate(probabilities, size=(rows, cols), mode="bilinear", align_corners=False)
        classes.append(probabilities.argmax(dim=1).numpy())
    return np.ascontiguousarray(from_slices(np.concatenate(classes).astype(np.int32), axis))
