"""Evaluate a sparse module with lm-evaluation-harness (optional extra: ``[lmeval]``).

lm-eval's ``HFLM`` wraps the in-memory model, so the masking hooks that
:class:`~sparse_lightning.SparseActivationModule` installs apply to every request it scores.

Example:
    >>> module = SparseActivationModule.from_pretrained(model, ckpt, mlp=0.5)  # doctest: +SKIP
    >>> results = evaluate_with_lm_eval(
    ...     module, ["openbookqa_local"], include_path="recipes/lm_eval", limit=50
    ... )  # doctest: +SKIP
    >>> results["results"]["openbookqa_local"]["acc,none"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sparse_lightning.module import SparseActivationModule


def evaluate_with_lm_eval(
    module: SparseActivationModule,
    tasks: Sequence[str],
    include_path: str | os.PathLike[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval tasks on the module's model at its current sparsity.

    Args:
        module: the wrapper (its tokenizer is required).
        tasks: task names, e.g. ``["openbookqa_local"]`` from ``recipes/lm_eval``.
        include_path: folder of local task YAML files.
        limit: documents per task (an int) or a fraction.
        batch_size: requests per forward.
        **kwargs: passed to ``lm_eval.simple_evaluate``.

    Returns:
        lm-eval's result dict (``results[task]["acc,none"]``, ...).

    Raises:
        ImportError: lm-eval is not installed (``pip install 'sparse_lightning[lmeval]'``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "evaluate_with_lm_eval needs lm-evaluation-harness: "
            "pip install 'sparse_lightning[lmeval]'."
        ) from error
    if module.tokenizer is None:
        raise ValueError("lm-eval needs text: build the module with its tokenizer.")
    lm = HFLM(
        pretrained=module.model,
        tokenizer=module.tokenizer,
        batch_size=batch_size,
        device=str(module.device),
    )
    manager = TaskManager(include_path=str(include_path)) if include_path else None
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)
