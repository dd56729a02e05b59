"""A few-shot adapter: everything learned from the labelled slices, savable as one `.fsam` file.

It holds the structures (segment names, colours, label values), the pixel prompts, the structure tokens, the
structures' footprints and the tuned mask decoder, plus the name and weights checksum of the model it was made with,
so it can segment new scans of the same anatomy with no labels of their own; an adapter made on one scan with
registration asked for also keeps a small copy of it, to register it to each new scan (registration.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import catalog
from .atomic_write import write_atomically
from .body_frame import AUTO_FRAME, BODY_FRAME, IMAGE_FRAME
from .errors import FewShotSAMError, FewShotSAMWarning, one_line
from .fewshot import FewShotCollection
from .models import SamModel
from .progress import NO_PROGRESS, Progress
from .prompts import PixelClassifier, structure_footprints, structure_tokens, train_pixel_classifier
from .registration import SupportImage
from .tuning import tune_decoder
from .volume import HasSegments, Segment

FORMAT_VERSION = 1


@dataclass
class AdaptOptions:
    prompt_steps: int = 200  # pixel-prompt classifier training steps
    decoder_steps: int = 16  # mask decoder tuning steps (0: keep the pretrained decoder)
    seed: int = 0
    # Where the pixel prompts and footprints measure positions: "body" (relative to the body's box on each slice,
    # so they carry over to other patients), "image" (the model-input square; every model made before this) or
    # "auto": body for a model made to segment other scans (Engine.adapt), image for segmenting the painted scan
    # itself (Engine.propagate: positions need not carry over there, and the body frame lost 0.009 whole-volume
    # Dice at k = 3 on CHAOS; benchmarks/results/protocol2_body_frame.md).
    # The image frame stays the default: "auto" raised protocol 2 (0.802 -> 0.828) but lost the liver of CHAOS 3
    # from a liver-and-spleen model of CHAOS 2 (0.814 -> 0.620 with the second pass), which the Slicer and web
    # save-and-apply tests caught.
    position_frame: str = IMAGE_FRAME
    # The decoder's forward passes while tuning: "fp32", "bf16" or "auto" (bf16 on a CPU with bf16 instructions,
    # else fp32; tuning.tuning_autocast). fp32 stays the default: "auto" tuned 23% faster on a Zen 5 with the same
    # protocol-1 Dice, but a liver-and-spleen model of CHAOS 2 applied to CHAOS 3 (the Slicer save-and-apply test)
    # found the spleen at 0.436 against 0.699 in fp32; models made for other scans were not measured further.
    tuning_precision: str = catalog.DEFAULT_TUNING_PRECISION

    def resolved(self, across_scans: bool) -> "AdaptOptions":
        """These options with an "auto" frame made definite: body across scans, image within one."""
        if self.position_frame != AUTO_FRAME:
            return self
        return dataclasses.replace(self, position_frame=BODY_FRAME if across_scans else IMAGE_FRAME)


@dataclass
class FewShotAdapter(HasSegments):
    segments: list[Segment]
    classifier: PixelClassifier
    tokens: torch.Tensor  # [S, C]
    decoder_state: dict
    model_id: str
    options: AdaptOptions = field(default_factory=AdaptOptions)
    n_labelled_slices: int = 0
    # The support scans' modalities ("CT", "MR", "unknown"), to warn when the model meets another kind of scan.
    # Empty for models saved before this was recorded.
    support_modalities: list[str] = field(default_factory=list)
    footprints: torch.Tensor | None = None  # [S, H, W] (prompts.structure_footprints); None in older .fsam files
    # A small copy of the support scan, to register it to a query (registration.py); None unless made on one scan
    # with registration asked for (EngineOptions.register), and in older .fsam files (those apply in the image frame,
    # as before).
    support_image: SupportImage | None = None

    @property
    def position_frame(self) -> str:
        """The frame of the pixel prompts' positions and of the footprints (body_frame.FRAMES)."""
        return self.classifier.frame

    @contextlib.contextmanager
    def tuned_decoder(self, model: SamModel):
        """Temporarily load the tuned decoder weights into the model."""
        original = copy.deepcopy(model.mask_decoder.state_dict())
        model.mask_decoder.load_state_dict(self.decoder_state)
        try:
            yield model
        finally:
            model.mask_decoder.load_state_dict(original)

    def check_model(self, model: SamModel, path: str | Path = "adapter") -> None:
        if model.weights_id != self.model_id:
            raise FewShotSAMError(f"{path}: made with model {self.model_id}, "
                                  f"but the model in use is {model.weights_id}")
        expected = {name: tuple(value.shape) for name, value in model.mask_decoder.state_dict().items()}
        stored = {name: tuple(getattr(value, "shape", ())) for name, value in self.decoder_state.items()}
        if stored != expected:
            wrong = sorted(set(stored) ^ set(expected)) or [n for n in expected if stored[n] != expected[n]]
            raise FewShotSAMError(f"{path}: damaged model file: its tuned decoder does not fit {self.model_id} "
                                  f"({len(wrong)} weights differ, e.g. {wrong[0]})")

    def warn_if_unlike_support(self, modality: str, scan_name: str = "the scan") -> None:
        """Warn when the scan is CT and the support scans were not, or the other way round (an MR model on a CT
        finds few of its organs)."""
        if not self.support_modalities:
            return
        support_ct = {m == "CT" for m in self.support_modalities}
        if len(support_ct) == 1 and (modality == "CT") not in support_ct:
            kinds = "/".join(sorted(set(self.support_modalities)))
            support = "CT" if support_ct == {True} else f"non-CT ({kinds})"
            this = "CT" if modality == "CT" else f"not CT ({modality})"
            warnings.warn(f"{scan_name} is {this}, but the model was adapted on {support} scans; expect a poor "
                          f"result, or adapt a model on scans like this one", FewShotSAMWarning, stacklevel=2)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FewShotSAMError(f"{path}: file exists; pass --overwrite to replace it")
        payload = self.payload()
        try:
            return write_atomically(path, lambda temporary: torch.save(payload, temporary))
        except (OSError, RuntimeError) as error:  # a full disk surfaces as RuntimeError from torch's zip writer
            raise FewShotSAMError(f"cannot write {path}: {one_line(error, with_type=False)}") from None

    def payload(self) -> dict:
        """Everything the adapter holds, as plain tensors and values (what a .fsam file and a run record store)."""
        return {
            "format": "fewshotsam-adapter",
            "version": FORMAT_VERSION,
            "segments": [asdict(segment) for segment in self.segments],
            "classifier": self.classifier.state_dict(),
            "classifier_shape": [self.classifier.net[0].in_features, self.classifier.net[0].out_features,
                                 self.classifier.net[2].out_features],
            "tokens": self.tokens,
            "decoder": self.decoder_state,
            "model_id": self.model_id,
            "options": asdict(self.options),
            "n_labelled_slices": self.n_labelled_slices,
            "support_modalities": list(self.support_modalities),  # optional: older files lack it
            "footprints": self.footprints,
            "position_frame": self.position_frame,  # optional: older files lack it (their frame is the image)
            # optional: older files lack it (no registration)
            "support_image": None if self.support_image is None else self.support_image.payload(),
        }

    @classmethod
    def load(cls, path: str | Path) -> "FewShotAdapter":
        path = Path(path)
        if not path.is_file():
            raise FewShotSAMError(f"{path}: adapted model file not found")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FewShotSAMError(f"{path}: not a FewShotSAM model file ({type(error).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != "fewshotsam-adapter":
            raise FewShotSAMError(f"{path}: not a FewShotSAM model file")
        if not isinstance(payload.get("version"), int):
            raise FewShotSAMError(f"{path}: damaged model file: no format version")
        if payload["version"] > FORMAT_VERSION:
            raise FewShotSAMError(f"{path}: made by a newer FewShotSAM (format {payload['version']}); upgrade")
        missing = [key for key in _REQUIRED_KEYS if key not in payload]
        if missing:
            raise FewShotSAMError(f"{path}: damaged model file: missing {', '.join(missing)}")
        try:
            return cls.from_payload(payload)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            reason = " ".join(str(error).split())[:200]
            raise FewShotSAMError(f"{path}: damaged model file ({type(error).__name__}: {reason})") from None

    @classmethod
    def from_payload(cls, payload: dict) -> "FewShotAdapter":
        """The adapter of payload(); raises KeyError, TypeError, ValueError or RuntimeError on a damaged one."""
        n_features, hidden, n_classes = (int(v) for v in payload["classifier_shape"])
        frame = str(payload.get("position_frame", IMAGE_FRAME))
        classifier = PixelClassifier(n_features, n_classes, hidden, frame)  # ValueError on an unknown frame
        classifier.load_state_dict(payload["classifier"])  # RuntimeError on missing or mis-shaped weights
        segments = [Segment(str(s["name"]), int(s["label_value"]), tuple(float(c) for c in s["color"]))
                    for s in payload["segments"]]
        tokens = payload["tokens"]
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(segments):
            raise ValueError(f"structure tokens of shape {tuple(getattr(tokens, 'shape', ()))} do not match its "
                             f"{len(segments)} segments")
        if n_classes != len(segments) + 1:
            raise ValueError(f"the pixel classifier has {n_classes} classes for {len(segments)} segments")
        if not isinstance(payload["decoder"], dict):
            raise TypeError("the tuned decoder is not a set of weights")
        return cls(segments, classifier.eval().requires_grad_(False), tokens, payload["decoder"],
                   str(payload["model_id"]), AdaptOptions(**{"position_frame": frame, **payload.get("options", {})}),
                   int(payload.get("n_labelled_slices", 0)), [str(m) for m in payload.get("support_modalities", [])],
                   _footprints(payload.get("footprints"), len(segments)),
                   _support_image(payload.get("support_image")))


def _footprints(footprints, n_segments: int) -> torch.Tensor | None:
    """The saved footprints, or None for a model saved before they existed."""
    if footprints is None:
        return None
    if not isinstance(footprints, torch.Tensor) or footprints.ndim != 3 or footprints.shape[0] != n_segments:
        raise ValueError(f"footprints of shape {tuple(getattr(footprints, 'shape', ()))} do not match its "
                         f"{n_segments} segments")
    return footprints.float()


def _support_image(payload) -> SupportImage | None:
    """The saved support image copy, or None for a model saved without one."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise TypeError("the support image copy is not a set of values")
    return SupportImage.from_payload(payload)


_REQUIRED_KEYS = ("segments", "classifier", "classifier_shape", "tokens", "decoder", "model_id")


def adapt(model: SamModel, collection: FewShotCollection, options: AdaptOptions | None = None,
          progress: Progress = NO_PROGRESS) -> FewShotAdapter:
    """Learn the pixel prompts and structure tokens, and tune the decoder, from a few-shot collection."""
    options = (options or AdaptOptions()).resolved(across_scans=True)  # an adapter made alone may meet other scans
    classifier = train_pixel_classifier(collection, steps=options.prompt_steps, seed=options.seed, progress=progress,
                                        frame=options.position_frame)
    tokens = structure_tokens(collection)
    decoder_state = tune_decoder(model, collection, tokens, steps=options.decoder_steps, seed=options.seed,
                                 progress=progress, precision=options.tuning_precision)
    return FewShotAdapter(list(collection.segments), classifier, tokens, decoder_state, model.weights_id, options,
                          collection.embeddings.shape[0],
                          footprints=structure_footprints(collection, frame=options.position_frame))


def tune_on(model: SamModel, start: FewShotAdapter, collection: FewShotCollection, tokens: torch.Tensor,
            prompt_steps: int, decoder_steps: int, seed: int, progress: Progress = NO_PROGRESS,
            focus: list[int] | None = None) -> tuple[PixelClassifier, dict]:
    """`start`'s pixel prompts and tuned decoder trained on for a few steps on `collection` (a warm start after the
    user paints a slice, or apply's second pass on a scan's confident slices): (classifier, decoder state).

    prompt_steps 0 keeps start's classifier; focus: indices into the collection that every decoder batch includes."""
    classifier = start.classifier
    if prompt_steps > 0:
        classifier = train_pixel_classifier(collection, steps=prompt_steps, seed=seed, progress=progress,
                                            start=start.classifier)
    decoder_state = tune_decoder(model, collection, tokens, steps=decoder_steps, seed=seed, progress=progress,
                                 start_state=start.decoder_state, focus=focus,
                                 precision=start.options.tuning_precision)
    return classifier, decoder_state

