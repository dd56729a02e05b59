"""Model loading: the bundled LiteMedSAM weights, and the checkpoint path of the SAM ViT family."""

from __future__ import annotations

import pytest
import torch

from FewShotSAMLib.decoder import decode
from FewShotSAMLib.errors import FewShotSAMError
from FewShotSAMLib.models import (
    LITEMEDSAM_SHA256,
    file_sha256,
    litemedsam_weights_path,
    load_model,
    preload_model,
    save_random_checkpoint,
)
from FewShotSAMLib.queries import query_tokens


def test_litemedsam_weights_are_bundled_and_verified():
    path = litemedsam_weights_path()
    assert file_sha256(path) == LITEMEDSAM_SHA256
    model = load_model("litemedsam", device="cpu")
    assert model.spec.input_size == 256
    embeddings = model.encode(torch.rand(1, 3, 256, 256), path="fp32")
    assert embeddings.shape == (1, 256, 64, 64)
    assert torch.isfinite(embeddings).all()


def test_the_dense_positional_encoding_is_computed_once_and_equals_the_prompt_encoders():
    model = load_model("litemedsam", device="cpu")
    kept = model.image_pe()
    assert model.image_pe() is kept  # no recomputation per decoder call
    assert torch.equal(kept, model.prompt_encoder.get_dense_pe())
    assert kept.shape == (1, 256, 64, 64) and not kept.requires_grad


def test_sam_vit_b_loads_from_a_checkpoint_file(tmp_path):
    checkpoint = save_random_checkpoint("sam_vit_b", tmp_path / "sam_vit_b_random.pth")
    model = load_model("sam_vit_b", checkpoint, device="cpu")
    assert model.spec.input_size == 1024
    assert model.weights_id.startswith("sam_vit_b:")
    embeddings = model.encode(torch.rand(1, 3, 1024, 1024), path="fp32")
    assert embeddings.shape == (1,) + model.spec.embedding_shape
    boxes = torch.tensor([[100.0, 120.0, 400.0, 380.0]])
    logits, quality = decode(model, embeddings, query_tokens(model, boxes, torch.zeros(1, 256)))
    assert logits.shape == (1, 256, 256) and quality.shape == (1,)


def test_a_preloaded_model_is_handed_out_once_and_only_for_its_arguments(tmp_path):
    from FewShotSAMLib import models

    preload_model("litemedsam", device="cpu")  # what the standby process does before its job arrives
    (built_ahead,) = models._PRELOADED.values()
    with pytest.raises(FewShotSAMError, match="checkpoint file not found"):  # never served for another checkpoint
        load_model("litemedsam", tmp_path / "missing.pth", device="cpu")
    assert load_model("litemedsam", device="cpu") is built_ahead
    assert load_model("litemedsam", device="cpu") is not built_ahead  # handed out once: never shared
    assert not models._PRELOADED


def test_models_that_need_a_checkpoint_say_so():
    with pytest.raises(FewShotSAMError, match="needs --checkpoint"):
        load_model("medsam_vit_b")


def test_unknown_model_is_refused():
    with pytest.raises(FewShotSAMError, match="unknown model"):
        load_model("sam_vit_z")
