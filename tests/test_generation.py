"""The wrapped model runs sparse everywhere a Hugging Face model is used (real SmolLM2)."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, calibrate
from torch.utils.data import DataLoader
from transformers import pipeline

from sparse_lightning import QACollator, SparseActivationModule, load_truthfulqa

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def sparse_smollm2(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    path = SHARED_DATA / "TruthfulQA.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: these tests read the shared data beside the checkout")
    loader = DataLoader(
        load_truthfulqa(path, rows=range(400, 404)),
        batch_size=4,
        collate_fn=QACollator(tokenizer),
    )
    _, _, callback = calibrate(
        model, loader, run_name="gen", dirpath=tmp_path_factory.mktemp("gen")
    )
    module = SparseActivationModule.from_pretrained(
        model, callback.checkpoint_path, 0.5, tokenizer=tokenizer
    )
    yield module, tokenizer
    module.disable_sparsity()  # the model object is shared by other tests


def greedy(model, tokenizer, n: int = 12) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_generate_is_sparse_at_half_and_dense_at_zero(sparse_smollm2):
    module, tokenizer = sparse_smollm2
    sparse = greedy(module.model, tokenizer)
    assert module.realized_sparsity(reset=True)["mlp_zero_ratio"] > 0.2
    module.set_sparsity(0.0)
    dense_via_module = greedy(module.model, tokenizer)
    module.disable_sparsity()
    dense = greedy(module.model, tokenizer)
    module.set_sparsity(0.5)
    assert dense_via_module == dense
    assert sparse != dense


def test_text_generation_pipeline_runs_sparse(sparse_smollm2):
    module, tokenizer = sparse_smollm2
    generate = pipeline("text-generation", model=module.model, tokenizer=tokenizer, device="cpu")
    kwargs = dict(max_new_tokens=12, do_sample=False, return_full_text=False)
    sparse = generate(PROMPT, **kwargs)[0]["generated_text"]
    module.disable_sparsity()
    dense = generate(PROMPT, **kwargs)[0]["generated_text"]
    module.set_sparsity(0.0)
    zero = generate(PROMPT, **kwargs)[0]["generated_text"]
    module.set_sparsity(0.5)
    assert zero == dense
    assert sparse != dense


def test_lm_eval_hflm_scores_the_sparse_model(sparse_smollm2):
    lm_eval_hf = pytest.importorskip(
        "lm_eval.models.huggingface", reason="lm-eval is an optional extra (pip install lm-eval)"
    )
    from lm_eval.api.instance import Instance

    module, tokenizer = sparse_smollm2
    # lm-eval scores a continuation in one forward over context + continuation, which the
    # default decode-only phase runs dense: sparsify every token here.
    module.set_sparsity(0.5, phase="all")
    request = Instance(
        request_type="loglikelihood",
        doc={},
        idx=0,
        arguments=("The capital of France is", " Paris"),
    )
    lm = lm_eval_hf.HFLM(pretrained=module.model, tokenizer=tokenizer, device="cpu", batch_size=1)
    sparse = lm.loglikelihood([request])[0][0]
    module.disable_sparsity()
    dense = lm.loglikelihood([request])[0][0]
    module.set_sparsity(0.0)
    zero = lm.loglikelihood([request])[0][0]
    module.set_sparsity(0.5)
    assert zero == pytest.approx(dense, abs=1e-6)
    assert abs(sparse - dense) > 1e-3
