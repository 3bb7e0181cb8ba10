"""``AttributionCalibration``: measure every unit's attribution during ``trainer.validate``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sparse_lightning.architectures import UNIT_KINDS
from sparse_lightning.attribution.functional import integration_points
from sparse_lightning.attribution.scores import AttributionScores
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.checkpoint import DEFAULT_DIR, save_statistics
from sparse_lightning.hooks import ActivationCapture, gradients_enabled
from sparse_lightning.module import SparseActivationModule, TeacherForcedBatch


class AttributionCalibration(Callback):
    """Accumulate attribution statistics of MLP neurons and attention heads over a dataloader.

    Attach it to a ``Trainer`` and run ``trainer.validate(module, dataloader)`` with a
    :class:`~sparse_lightning.module.SparseActivationModule`. Each batch costs one forward
    (the module's ``validation_step``) and one backward, which yield every layer's and every
    unit kind's activations ``a`` and gradients ``g`` at once; integrated gradients adds
    ``ig_steps - 1`` forward + backward passes. Works with Lightning's default
    ``inference_mode=True`` and with ``inference_mode=False``; no weight changes and no
    ``param.grad`` is allocated. The sanity-check loop of ``fit`` is ignored.

    The statistics are torchmetrics states with sum reduction, so DDP runs add up; after
    ``validate`` every rank holds the same :attr:`statistics`.

    Args:
        units: unit kinds to measure, ``"mlp"`` and/or ``"heads"``.
        ig_steps: integration steps of integrated gradients (0 = skip IG; the paper's
            scripts use 20). All captured layers are scaled together at each step.
        run_name: when set, rank 0 writes ``<dirpath>/<run_name>.safetensors`` at the end.
        dirpath: folder of the checkpoint.
        dataset: a description of the calibration data, stored in the checkpoint.

    Example:
        >>> calibration = AttributionCalibration(ig_steps=4)
        >>> trainer = L.Trainer(accelerator="cpu", callbacks=[calibration])  # doctest: +SKIP
        >>> trainer.validate(module, loader)  # doctest: +SKIP
        >>> calibration.statistics.heads.score("corrected_gxo")  # doctest: +SKIP
    """

    def __init__(
        self,
        units: Sequence[str] = UNIT_KINDS,
        ig_steps: int = 0,
        run_name: str | None = None,
        dirpath: str | os.PathLike[str] = DEFAULT_DIR,
        dataset: str = "",
    ) -> None:
        super().__init__()
        if not units or set(units) - set(UNIT_KINDS):
            raise ValueError(f"units must be a non-empty subset of {UNIT_KINDS}, got {units}.")
        if ig_steps < 0:
            raise ValueError(f"ig_steps must be >= 0 (0 disables IG), got {ig_steps}.")
        self.units = tuple(k for k in UNIT_KINDS if k in units)
        self.ig_steps = ig_steps
        self.run_name = run_name
        self.dirpath = Path(dirpath)
        self.dataset = dataset
        self.checkpoint_path: Path | None = None
        self.scores: dict[str, AttributionScores] = {}
        self._statistics: Statistics | None = None
        self._capture: ActivationCapture | None = None
        self._batches = 0

    @property
    def statistics(self) -> Statistics:
        """The result of the last run (see :mod:`sparse_lightning.attribution.statistics`)."""
        if self._statistics is None:
            raise RuntimeError(
                "No calibration has finished yet: run trainer.validate(module, dataloader) with "
                "this callback and a non-empty dataloader first."
            )
        return self._statistics

    # --------------------------------------------------------------------- override points
    def attribute(
        self, module: SparseActivationModule, loss_sum: Tensor, batch: TeacherForcedBatch
    ) -> None:
        """Add one batch: gradients of ``loss_sum`` w.r.t. the captured units, then IG passes."""
        capture = self._require_capture(module)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"The answer loss is {loss_sum.item()} (not finite), so attributions would be "
                "NaN. Check the model's weights and dtype (float16 overflows; use float32 or "
                "bfloat16) and that the batch's token ids are within the vocabulary."
            )
        mask = batch.predict_mask.flatten()
        with gradients_enabled():
            grads = torch.autograd.grad(loss_sum, capture.tensors())
            acts = [t.detach() for t in capture.tensors()]
            capture.clear()  # frees the graph before the IG passes build theirs
            path_mean = self._mean_path_gradient(module, batch, grads) if self.ig_steps else None
        a_by, g_by = capture.by_kind(acts), capture.by_kind(grads)
        ig_by = capture.by_kind(path_mean) if path_mean is not None else None
        for kind in self.units:
            for layer, (a, g) in enumerate(zip(a_by[kind], g_by[kind], strict=True)):
                ig = ig_by[kind][layer][mask] if ig_by is not None else None
                self.scores[kind].update(layer, a[mask], g[mask], ig)

    # ------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SparseActivationModule):
            raise TypeError(
                "AttributionCalibration needs a sparse_lightning.SparseActivationModule, got "
                f"{type(pl_module).__name__}; wrap your model: SparseActivationModule(model)."
            )
        arch = pl_module.architecture
        self.scores = {
            kind: AttributionScores(
                kind, arch.num_layers, arch.units(kind), integrated_gradients=self.ig_steps > 0
            ).to(pl_module.device)
            for kind in self.units
        }
        self._batches = 0
        self._statistics = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if pl_module.masking is not None:
            raise RuntimeError(
                "The module runs sparse; calibration measures the dense model. Call "
                "module.disable_sparsity() before trainer.validate with AttributionCalibration."
            )
        for scores in self.scores.values():
            scores.to(pl_module.device).reset()
        self._batches = 0
        self._capture = ActivationCapture(pl_module.architecture, self.units).__enter__()
        pl_module.activation_capture = self._capture

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        self.attribute(pl_module, outputs["loss_sum"], outputs["batch"])
        self._batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # compute() is collective under DDP: every rank calls it and gets the global sums.
        units = {kind: scores.compute() for kind, scores in self.scores.items()}
        self._statistics = Statistics(
            units,
            ig_steps=self.ig_steps,
            metadata={
                "targets": pl_module.targets,
                "fingerprint": pl_module.architecture.fingerprint.to_json(),
                "base_model": str(getattr(pl_module.model, "name_or_path", "") or ""),
                "dataset": self.dataset,
            },
        )
        if self.run_name is not None and trainer.is_global_zero:
            path = self.dirpath / f"{self.run_name}.safetensors"
            self.checkpoint_path = save_statistics(self._statistics, path)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach(pl_module)
        if stage == "validate" and self._statistics is None and self._batches == 0:
            raise ValueError(
                "AttributionCalibration saw no batch: the validation dataloader is empty. "
                "Pass a dataloader with at least one batch (check the dataset split and "
                "limit_val_batches)."
            )

    # ----------------------------------------------------------------------------- helpers
    def _mean_path_gradient(
        self,
        module: SparseActivationModule,
        batch: TeacherForcedBatch,
        dense_grads: Sequence[Tensor],
    ) -> list[Tensor]:
        # The last integration point is alpha = 1, whose gradients are the dense ones.
        capture = self._require_capture(module)
        total = list(dense_grads)
        for alpha in integration_points(self.ig_steps)[:-1].tolist():
            with capture.record(scale=alpha):
                loss = module.answer_loss(batch)
            total = [
                t + g
                for t, g in zip(total, torch.autograd.grad(loss, capture.tensors()), strict=True)
            ]
            capture.clear()
        return [t / self.ig_steps for t in total]

    def _require_capture(self, module: SparseActivationModule) -> ActivationCapture:
        if module.activation_capture is None or not self.scores:
            raise RuntimeError(
                "attribute() needs the callback set up and an ActivationCapture attached to the "
                "module; it runs inside trainer.validate with this callback."
            )
        return module.activation_capture

    def _detach(self, pl_module: L.LightningModule) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        if isinstance(pl_module, SparseActivationModule):
            pl_module.activation_capture = None
