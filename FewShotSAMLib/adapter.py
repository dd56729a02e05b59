"""A few-shot adapter: everything learned from the labelled slices, savable as one `.fsam` file.

It holds the structures (segment names, colours, label values), the pixel prompts, the structure tokens and the
tuned mask decoder, plus the name and weights checksum of the model it was made with, so it can segment new scans
of the same anatomy with no labels of their own.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic_write import write_atomically
from .errors import FewShotSAMError
from .fewshot import FewShotCollection
from .models import SamModel
from .progress import NO_PROGRESS, Progress
from .prompts import PixelClassifier, structure_tokens, train_pixel_classifier
from .tuning import tune_decoder
from .volume import HasSegments, Segment

FORMAT_VERSION = 1


@dataclass
class AdaptOptions:
    prompt_steps: int = 200  # pixel-prompt classifier training steps
    decoder_steps: int = 16  # mask decoder tuning steps (0: keep the pretrained decoder)
    seed: int = 0


@dataclass
class FewShotAdapter(HasSegments):
    segments: list[Segment]
    classifier: PixelClassifier
    tokens: torch.Tensor  # [S, C]
    decoder_state: dict
    model_id: str
    options: AdaptOptions = field(default_factory=AdaptOptions)
    n_labelled_slices: int = 0


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
            raise FewShotSAMError(f"{path}: made with model {self.model_id}, but the model in use is {model.weights_id}")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FewShotSAMError(f"{path}: file exists; pass --overwrite to replace it")
        payload = {
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
        }
        return write_atomically(path, lambda temporary: torch.save(payload, temporary))

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
        if payload["version"] > FORMAT_VERSION:
            raise FewShotSAMError(f"{path}: made by a newer FewShotSAM (format {payload['version']}); upgrade")
        n_features, hidden, n_classes = payload["classifier_shape"]
        classifier = PixelClassifier(n_features, n_classes, hidden)
        classifier.load_state_dict(payload["classifier"])
        segments = [Segment(s["name"], int(s["label_value"]), tuple(s["color"])) for s in payload["segments"]]
        return cls(segments, classifier.eval().requires_grad_(False), payload["tokens"], payload["decoder"],
                   payload["model_id"], AdaptOptions(**payload["options"]), payload["n_labelled_slices"])


def adapt(model: SamModel, collection: FewShotCollection, options: AdaptOptions | None = None,
          progress: Progress = NO_PROGRESS) -> FewShotAdapter:
    """Learn the pixel prompts and structure tokens, and tune the decoder, from a few-shot collection."""
    options = options or AdaptOptions()
    classifier = train_pixel_classifier(collection, steps=options.prompt_steps, seed=options.seed, progress=progress)
    tokens = structure_tokens(collection)
    decoder_state = tune_decoder(model, collection, tokens, steps=options.decoder_steps, seed=options.seed,
                                 progress=progress)
    return FewShotAdapter(list(collection.segments), classifier, tokens, decoder_state, model.weights_id, options,
                          collection.embeddings.shape[0])
