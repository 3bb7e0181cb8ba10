"""QA sources and the data module: parsed fields against the raw files, splits, bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import SHARED_DATA, char_tokenizer

from sparse_lightning.data import QADataModule
from sparse_lightning.data.sources import DataError, load_examples

TRUTHFULQA = SHARED_DATA / "TruthfulQA.csv"
OPENBOOKQA = SHARED_DATA / "openbookqa_test.jsonl"
needs_shared = pytest.mark.skipif(
    not TRUTHFULQA.is_file(),
    reason="../shared/data (TruthfulQA, OpenBookQA) is not beside the repo",
)


@needs_shared
def test_truthfulqa_fields_and_mc1_choices_match_the_csv():
    with TRUTHFULQA.open(newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    examples = load_examples(TRUTHFULQA, "truthfulqa")
    assert len(examples) == len(raw) == 817
    for row, example in zip(raw[:50], examples[:50], strict=True):
        incorrect = [s.strip() for s in row["Incorrect Answers"].split(";") if s.strip()]
        assert example["question"] == row["Question"]
        assert example["answer"] == row["Best Answer"]
        assert row["Best Answer"] in example["correct_answers"]
        assert example["choices"] == [row["Best Answer"], *incorrect]  # MC1
        assert example["label"] == 0


@needs_shared
def test_openbookqa_label_is_the_answer_key_position():
    raw = [json.loads(line) for line in OPENBOOKQA.open()]
    examples = load_examples(OPENBOOKQA, "openbookqa")
    assert len(examples) == 500
    for row, example in zip(raw, examples, strict=True):
        texts = [c["text"] for c in row["question"]["choices"]]
        assert example["choices"] == texts
        assert "ABCD"[example["label"]] == row["answerKey"]
        assert example["answer"] == texts["ABCD".index(row["answerKey"])]


def test_generic_csv_with_a_column_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("Q,A,Wrong\nWhat is up?,The sky,The ground; A rock\nWho?,Me,You\n")
    examples = load_examples(
        path, "generic", columns={"question": "Q", "answer": "A", "incorrect_answers": "Wrong"}
    )
    assert examples[0]["question"] == "What is up?"
    assert examples[0]["correct_answers"] == ["The sky"]
    assert examples[0]["choices"] == ["The sky", "The ground", "A rock"]
    assert examples[1]["choices"] == ["Me", "You"]


def test_generic_json_with_choices_and_letter_labels(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"q": "2+2?", "options": ["3", "4"], "key": "B"},
        {"q": "1+1?", "options": ["2", "5"], "key": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples(
        path, "generic", {"question": "q", "choices": "options", "label": "key"}
    )
    assert [e["label"] for e in examples] == [1, 0]
    assert [e["answer"] for e in examples] == ["4", "2"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"not found.*nope\.csv"):
        load_examples(tmp_path / "nope.csv", "generic")


def test_missing_column_names_the_column_the_file_and_the_fix(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError) as error:
        load_examples(path, "generic", columns={"answer": "Answer"})
    message = str(error.value)
    assert "'Answer'" in message and "qa.csv" in message and "columns=" in message


def test_unknown_format_lists_the_formats():
    with pytest.raises(DataError, match=r"truthfulqa.*openbookqa.*generic"):
        load_examples("demo", "squad")  # type: ignore[arg-type]


def test_empty_and_overlapping_splits_fail_clearly():
    with pytest.raises(DataError, match=r"evaluation split \[5, 5\).*empty"):
        QADataModule(
            "demo", "generic", calibration_rows=(0, 4), evaluation_rows=(5, 5)
        ).test_dataloader()
    with pytest.raises(DataError, match="share 2 rows"):
        QADataModule("demo", "generic", calibration_rows=(0, 4), evaluation_rows=(2, 6))
    with pytest.raises(DataError, match=r"reaches outside.*48 rows"):
        QADataModule(
            "demo", "generic", calibration_rows=(0, 4), evaluation_rows=(40, 60)
        ).examples_of("evaluation")


def test_loaders_serve_the_recorded_splits_left_padded():
    tokenizer = char_tokenizer()
    dm = QADataModule(
        "demo",
        "generic",
        calibration_rows=(0, 4),
        evaluation_rows=(32, 36),
        batch_size=4,
        tokenizer=tokenizer,
    )
    examples = load_examples("demo", "generic")
    calibration = next(iter(dm.val_dataloader()))
    evaluation = next(iter(dm.test_dataloader()))
    assert calibration["correct_answers"] == [e["correct_answers"] for e in examples[0:4]]
    assert evaluation["correct_answers"] == [e["correct_answers"] for e in examples[32:36]]
    assert "rows [32, 36)" in dm.describe("evaluation")
    # Left padding: every prompt ends at the last column, so generation continues each one.
    mask = evaluation["prompt_attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()
    # No chat template on this tokenizer: the paper's prompt.
    first = mask[0].bool()
    prompt = tokenizer.decode(evaluation["prompt_input_ids"][0][first])
    assert prompt == f"Instruct: {examples[32]['question']}\nOutput:"
    # Choices are tokenized as the model would write them after "Output:" (leading space).
    assert (
        evaluation["choice_input_ids"][0][0]
        == tokenizer(" " + examples[32]["choices"][0])["input_ids"]
    )
    assert torch.equal(evaluation["label"], torch.zeros(4, dtype=torch.long))


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    dm = QADataModule(
        "demo", "generic", calibration_rows=(0, 2), evaluation_rows=(2, 4), tokenizer=tokenizer
    )
    batch = next(iter(dm.val_dataloader()))
    ids = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()]
    assert tokenizer.decode(ids) == "Q: What is the capital of France?\nA:"


def test_a_datamodule_without_tokenizer_says_how_to_get_one():
    dm = QADataModule("demo", "generic", calibration_rows=(0, 2), evaluation_rows=(2, 4))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dm.val_dataloader()
