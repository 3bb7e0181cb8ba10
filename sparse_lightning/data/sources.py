"""Reading QA datasets into one schema: TruthfulQA, OpenBookQA, and any JSON/CSV/hub dataset.

Every example becomes a dict with the same keys, whatever the source:

============================  =====================================================================
key                           meaning
============================  =====================================================================
``question``                  the question text (required)
``answer``                    the best reference answer (``""`` when the source has none)
``correct_answers``           every acceptable answer (gold for BLEU/ROUGE/SQuAD), at least
                              ``[answer]`` when an answer exists
``incorrect_answers``         wrong answers (TruthfulQA MC1 distractors)
``choices``, ``label``        multiple choice: the options and the index of the right one; without
                              a choices column, the best answer against the incorrect answers
                              (TruthfulQA MC1); ``[]`` and ``-1`` when there is neither
============================  =====================================================================

Example:
    >>> rows = load_examples("../shared/data/TruthfulQA.csv", "truthfulqa")  # doctest: +SKIP
    >>> rows[0]["choices"][rows[0]["label"]]  # doctest: +SKIP
    'The watermelon seeds pass through your digestive system'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

SourceFormat = Literal["truthfulqa", "openbookqa", "generic"]
FORMATS: tuple[str, ...] = ("truthfulqa", "openbookqa", "generic")
FIELDS = ("question", "answer", "correct_answers", "incorrect_answers", "choices", "label")

#: Column names of each known format (hub TruthfulQA "generation" and the CSV both work).
TRUTHFULQA_COLUMNS = {
    "csv": {
        "question": "Question",
        "answer": "Best Answer",
        "correct_answers": "Correct Answers",
        "incorrect_answers": "Incorrect Answers",
    },
    "hub": {
        "question": "question",
        "answer": "best_answer",
        "correct_answers": "correct_answers",
        "incorrect_answers": "incorrect_answers",
    },
}

#: The hub dataset used for ``format="truthfulqa"`` with no local path (needs network).
TRUTHFULQA_HUB = ("truthful_qa", "generation", "validation")

#: The QA set shipped inside the package for the offline demo (written for this project).
DEMO_QA = Path(__file__).resolve().parent / "demo" / "general_qa.jsonl"


class DataError(ValueError):
    """A QA data file or its columns do not match what was asked for."""


def load_examples(
    path: str | os.PathLike[str] | None,
    format: SourceFormat = "generic",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    subset: str | None = None,
) -> list[dict[str, Any]]:
    """Read a QA dataset into the common schema (see the module docstring).

    Args:
        path: a ``.csv``/``.json``/``.jsonl`` file, a hub dataset name, or ``None`` for
            TruthfulQA from the hub. ``"demo"`` is the QA set shipped with the package.
        format: ``"truthfulqa"`` (CSV or hub columns), ``"openbookqa"`` (``question.stem``,
            ``question.choices``, ``answerKey``) or ``"generic"`` (``columns`` maps fields).
        columns: for ``generic``: ``{field: column}``; fields missing from the mapping are
            looked up under their own name. ``correct_answers``/``incorrect_answers`` columns
            may hold lists or ``"; "``-separated strings; ``label`` an index, a letter or the
            right choice's text.
        split: hub split (files have one split, ``train``).
        subset: hub configuration name.

    Raises:
        DataError: missing file, unknown format, or a column that does not exist.
    """
    if format not in FORMATS:
        raise DataError(f"Unknown QA format {format!r}; choose one of {FORMATS}.")
    if str(path) == "demo":
        path, format = DEMO_QA, "generic"
    if path is None:
        if format != "truthfulqa":
            raise DataError(f"format={format!r} needs a path (a CSV/JSON file or hub name).")
        path, subset, split = TRUTHFULQA_HUB
    table, origin = _read_table(path, split, subset)
    if not table:
        raise DataError(f"{origin} has no rows.")
    if format == "openbookqa":
        _require_columns(table[0], ("question", "answerKey"), origin, "openbookqa")
        return [_openbookqa(row) for row in table]
    if format == "truthfulqa":
        layout = "csv" if "Question" in table[0] else "hub"
        columns = TRUTHFULQA_COLUMNS[layout]
    columns = {**{f: f for f in FIELDS}, **dict(columns or {})}
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(f"columns maps unknown field(s) {sorted(unknown)}; fields are {FIELDS}.")
    given = {"question": columns["question"]}
    if format == "generic":
        given.update({f: c for f, c in columns.items() if c != f})
    for field, column in given.items():
        _require_columns(table[0], (column,), origin, f"columns[{field!r}]")
    present = {f: c for f, c in columns.items() if c in table[0]}
    return [_generic(row, present) for row in table]


def load_truthfulqa(
    path: str | os.PathLike[str], rows: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """TruthfulQA examples from its CSV, in the schema above.

    Args:
        path: the CSV file (this project's checkouts have ``../shared/data/TruthfulQA.csv``).
        rows: row indices to keep, e.g. ``range(0, 100)`` (the paper's evaluation set).

    Returns:
        ``[{"question", "answer", "correct_answers", "incorrect_answers", "choices",
        "label"}, ...]``.
    """
    examples = load_examples(path, "truthfulqa")
    return examples if rows is None else [examples[i] for i in rows]


def select_rows(
    examples: Sequence[dict[str, Any]], rows: Sequence[int], name: str, origin: str = "the data"
) -> list[dict[str, Any]]:
    """The examples at ``rows``: a ``range`` or a half-open ``[start, stop)`` pair.

    Raises:
        DataError: the selection is empty or reaches past the end of the data.
    """
    indices = as_range(rows, name)
    if not indices:
        raise DataError(
            f"The {name} split [{indices.start}, {indices.stop}) of {origin} is empty; give "
            "[start, stop) with stop > start."
        )
    if max(indices) >= len(examples) or min(indices) < 0:
        raise DataError(
            f"The {name} split [{indices.start}, {indices.stop}) reaches outside {origin}, "
            f"which has {len(examples)} rows; choose rows in [0, {len(examples)})."
        )
    return [examples[i] for i in indices]


def as_range(rows: Sequence[int], name: str = "rows") -> range:
    """``range(start, stop)`` from a ``range`` or a ``[start, stop)`` pair."""
    if isinstance(rows, range):
        return rows
    if len(rows) != 2:
        raise DataError(f"The {name} split must be [start, stop), got {list(rows)}.")
    return range(int(rows[0]), int(rows[1]))


def _read_table(
    path: str | os.PathLike[str], split: str, subset: str | None
) -> tuple[list[dict[str, Any]], str]:
    import datasets

    datasets.logging.disable_progress_bar()
    local = Path(path)
    suffix = local.suffix.lower()
    if suffix in (".csv", ".json", ".jsonl"):
        if not local.is_file():
            raise DataError(
                f"QA data file not found: {local}. Check the path (relative paths are read "
                f"from {Path.cwd()}), e.g. ../shared/data/TruthfulQA.csv."
            )
        builder = "csv" if suffix == ".csv" else "json"
        table = datasets.load_dataset(builder, data_files=str(local), split="train")
        return table.to_list(), str(local)
    if local.exists():
        raise DataError(f"{local} is not a .csv, .json or .jsonl file.")
    try:
        table = datasets.load_dataset(str(path), subset, split=split)
    except Exception as error:  # hub errors come in many types; all mean "cannot read it"
        raise DataError(
            f"Could not load the hub dataset {str(path)!r} (subset {subset!r}, split "
            f"{split!r}): {error}. Offline, pass a local CSV/JSON file instead."
        ) from error
    return table.to_list(), f"hub dataset {path}"


def _require_columns(row: Mapping[str, Any], needed: Sequence[str], origin: str, what: str):
    missing = [c for c in needed if c not in row]
    if missing:
        raise DataError(
            f"{origin} has no column {missing[0]!r} (needed by {what}); its columns are "
            f"{sorted(row)}. Map the fields with columns={{'question': ..., 'answer': ...}}."
        )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    return [str(v) for v in value]


def _generic(row: Mapping[str, Any], present: Mapping[str, str]) -> dict[str, Any]:
    answer = str(row[present["answer"]] or "") if "answer" in present else ""
    correct = _as_list(row[present["correct_answers"]]) if "correct_answers" in present else []
    if answer and answer not in correct:
        correct.insert(0, answer)
    # A file where only some rows have choices holds None in the others.
    choices = [str(c) for c in row[present["choices"]] or []] if "choices" in present else []
    has_label = "label" in present and row[present["label"]] is not None
    label = _label(row[present["label"]], choices) if has_label and choices else -1
    incorrect = (
        _as_list(row[present["incorrect_answers"]]) if "incorrect_answers" in present else []
    )
    if not choices and answer and incorrect:  # TruthfulQA's MC1: best answer vs incorrect ones
        choices, label = [answer, *incorrect], 0
    return {
        "question": str(row[present["question"]]),
        "answer": answer or (choices[label] if label >= 0 else ""),
        "correct_answers": correct or ([choices[label]] if label >= 0 else []),
        "incorrect_answers": incorrect,
        "choices": choices,
        "label": label,
    }


def _label(value: Any, choices: Sequence[str]) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text in choices:
        return list(choices).index(text)
    if len(text) == 1 and text.isalpha():
        return ord(text.upper()) - ord("A")
    return int(text)


def _openbookqa(row: Mapping[str, Any]) -> dict[str, Any]:
    question = row["question"]
    labels = [c["label"] for c in question["choices"]]
    texts = [c["text"] for c in question["choices"]]
    label = labels.index(row["answerKey"])
    return {
        "question": question["stem"],
        "answer": texts[label],
        "correct_answers": [texts[label]],
        "incorrect_answers": [t for i, t in enumerate(texts) if i != label],
        "choices": texts,
        "label": label,
    }
