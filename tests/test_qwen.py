"""Integration: the second real model, Qwen2.5-Coder-0.5B-Instruct, on TruthfulQA questions."""

import pytest
import torch
from conftest import SHARED_DATA, quiet_trainer
from torch.utils.data import DataLoader

from sparse_lightning import (
    AttributionCalibration,
    QACollator,
    SparseActivationModule,
    load_truthfulqa,
)
from sparse_lightning.units import UNIT_KINDS

pytestmark = pytest.mark.slow


def test_qwen_calibrates_every_layer_and_unit_kind_on_truthfulqa(qwen):
    model, tokenizer = qwen
    path = SHARED_DATA / "TruthfulQA.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: this test reads the shared data beside the checkout")
    before = {k: v[:4].clone() for k, v in model.state_dict().items()}
    questions = load_truthfulqa(path, rows=range(400, 408))
    loader = DataLoader(questions, batch_size=4, collate_fn=QACollator(tokenizer))
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=16)
    callback = AttributionCalibration()
    quiet_trainer(callbacks=[callback]).validate(module, loader, verbose=False)
    stats = callback.statistics
    arch = module.architecture
    assert (arch.num_layers, arch.units("mlp"), arch.units("heads")) == (24, 4864, 14)
    assert stats.tokens >= 8
    for kind in UNIT_KINDS:
        units = arch.units(kind)
        for name in ("magnitude", "corrected_gxo", "gxo", "sq_gradient"):
            value = stats[kind].sums[name]
            assert value.shape == (24, units), (kind, name)
            assert torch.isfinite(value).all(), (kind, name)
            assert (value.abs().sum(1) > 0).all(), f"{kind} {name}: a layer is all zero"
        assert (stats[kind].layer_grad_norm > 0).all(), kind
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor[:4], before[name]), name
