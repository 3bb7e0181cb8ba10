"""The oracle: per-token masks from the sequence's own gradients (the paper's protocol).

Research only: the masks need the dense answer and one backward pass, so they exist only for
the batch they were computed on. :meth:`SparseActivationModule.sparse_logits` (and
``validate``) prepare them through the same capture API that calibration uses
(:func:`~sparse_lightning.attribution.capture.differentiate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from sparse_lightning.attribution.capture import CapturedUnits
from sparse_lightning.attribution.functional import check_metric, per_token_score
from sparse_lightning.selection.selectors import Selector, kept_count, top_k_mask


class OracleSelector(Selector):
    """Per-token masks computed beforehand from the sequence's own gradients.

    Args:
        sparsity: fraction of units zeroed per token.
        num_units: units per layer.
        metric: a metric that needs one backward (see
            :data:`~sparse_lightning.attribution.functional.ORACLE_METRICS`).
    """

    needs_batch = True

    def __init__(self, sparsity: float, num_units: int, metric: str) -> None:
        self.k = kept_count(num_units, sparsity)
        self.metric = check_metric(metric, one_backward=True)
        self.masks: Sequence[Tensor] | None = None

    def prepare(self, units: CapturedUnits) -> None:
        """Masks for the coming forward: top-k per token of the dense units' scores."""
        self.masks = [
            top_k_mask(per_token_score(self.metric, a, g), self.k)
            for a, g in zip(units.activations, units.gradients, strict=True)
        ]

    def keep(self, layer: int, units: Tensor) -> Tensor:
        if self.masks is None or self.masks[layer].shape != units.shape[:-1]:
            raise RuntimeError(
                "Oracle masks come from one sequence's own gradients, so they exist only for "
                "the batch they were computed on. Use SparseActivationModule.sparse_logits(batch) "
                "(or validate), which prepares them; for generate/pipelines choose "
                "mode='dynamic' or 'static'."
            )
        return self.masks[layer]


def prepare_oracles(selectors: Mapping[str, Selector], units: Mapping[str, CapturedUnits]) -> None:
    """Hand each oracle selector its kind's dense activations and gradients."""
    for kind, selector in selectors.items():
        if isinstance(selector, OracleSelector):
            selector.prepare(units[kind])
