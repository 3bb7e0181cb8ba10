"""Integration: the real SmolLM2-135M-Instruct on TruthfulQA questions from ../shared/data."""

import lightning as L
import pytest
import torch
from conftest import SHARED_DATA
from torch.utils.data import DataLoader

from sparse_lightning import (
    AttributionCalibration,
    QACollator,
    SparseActivationModule,
    load_truthfulqa,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def truthfulqa_path():
    path = SHARED_DATA / "TruthfulQA.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: these tests read the shared data beside the checkout")
    return path


def test_smollm2_calibrates_on_truthfulqa(smollm2, truthfulqa_path):
    model, tokenizer = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Questions 400-407: inside the calibration range (400-799) kept apart from the 0-99
    # evaluation questions.
    questions = load_truthfulqa(truthfulqa_path, rows=range(400, 408))
    loader = DataLoader(questions, batch_size=4, collate_fn=QACollator(tokenizer))
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=24)
    callback = AttributionCalibration(ig_steps=4)
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[callback], logger=False, enable_progress_bar=False
    )
    trainer.validate(module, loader, verbose=False)
    stats = callback.statistics
    assert stats.tokens >= 8  # at least one answer token per question
    for kind, units in (("mlp", 1536), ("heads", 9)):
        for name in ("corrected_gxo", "integrated_gradients", "gxo", "magnitude", "sq_gradient"):
            value = stats[kind].sums[name]
            assert value.shape == (30, units)
            assert torch.isfinite(value).all(), (kind, name)
            assert (value.abs().sum(1) > 0).all(), f"{kind} {name}: a layer is all zero"
        assert (stats[kind].layer_grad_norm > 0).all()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
