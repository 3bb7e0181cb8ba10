"""The lm-eval helper scores the (sparse) in-memory model like a hand computation (SmolLM2)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import SHARED_DATA

from sparse_lightning import SparseActivationModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install lm-eval)")
    data = SHARED_DATA / "openbookqa_test.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is absent: this test reads the shared data beside the checkout")
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lm_eval" / "openbookqa_local.yaml"
    task = yaml.safe_load(recipe.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)  # absolute: any working directory
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "openbookqa_local.yaml").write_text(yaml.safe_dump(task))
    return folder


def hand_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = len(context_ids)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))


def test_lm_eval_helper_matches_hand_log_likelihoods_dense_and_sparse(smollm2, task_dir):
    from sparse_lightning.lmeval import evaluate_with_lm_eval

    model, tokenizer = smollm2
    module = SparseActivationModule(model, tokenizer)
    lls = {}
    for name, mlp in (("dense", 0.0), ("sparse", 0.5)):
        module.set_sparsity(mlp=mlp, heads=0.0, mode="magnitude", phase="all")
        out = evaluate_with_lm_eval(
            module, ["openbookqa_local"], include_path=task_dir, limit=2, log_samples=True
        )
        samples = out["samples"]["openbookqa_local"]
        lls[name] = [resp[0][0] for s in samples for resp in s["resps"]]
        expected_hits = []
        for sample in samples:
            context = sample["arguments"][0][0]
            hand = [hand_log_likelihood(model, tokenizer, *a) for a in sample["arguments"]]
            got = [r[0][0] for r in sample["resps"]]
            assert got == pytest.approx(hand, abs=2e-3)
            assert context == sample["doc"]["question"]["stem"]
            expected_hits.append(
                float(max(range(len(hand)), key=hand.__getitem__) == sample["target"])
            )
        accuracy = out["results"]["openbookqa_local"]["acc,none"]
        assert accuracy == pytest.approx(sum(expected_hits) / len(expected_hits))
    module.disable_sparsity()
    assert lls["dense"] != pytest.approx(lls["sparse"], abs=1e-2)
