"""``AttributionCalibration``: measure every unit's attribution during ``trainer.validate``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sparse_lightning.architectures.weights import weights_digest
from sparse_lightning.attribution.capture import (
    ActivationCapture,
    CapturedUnits,
    differentiate,
    gradients_enabled,
)
from sparse_lightning.attribution.functional import integration_points
from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.attribution.sums import AttributionSums, SecondMoment
from sparse_lightning.checkpoint import DEFAULT_DIR, run_path, save_statistics
from sparse_lightning.data.teacher_forcing import TeacherForcedBatch
from sparse_lightning.inference.allocation_search import METHODS as SEARCHED
from sparse_lightning.inference.allocation_search import search_allocations
from sparse_lightning.module import SparseActivationModule
from sparse_lightning.selection.allocation import CHANNEL_KINDS
from sparse_lightning.units import check_kinds, kind_names


class AttributionCalibration(Callback):
    """Accumulate attribution statistics of every unit kind over a dataloader.

    Attach it to a ``Trainer`` and run ``trainer.validate(module, dataloader)`` with a
    :class:`~sparse_lightning.module.SparseActivationModule`. Each batch costs one forward
    (the module's ``validation_step``) and one backward, which yield every layer's and every
    unit kind's activations ``a`` and gradients ``g`` at once; integrated gradients adds
    ``ig_steps - 1`` forward + backward passes. The same forward gives the output projection's
    input, whose second moment over the answer-predicting tokens is kept too
    (``statistics.output``: where a sparse lm_head drops channels). Works with Lightning's default
    ``inference_mode=True`` and with ``inference_mode=False``; no weight changes and no
    ``param.grad`` is allocated. The sanity-check loop of ``fit`` is ignored.

    The statistics are torchmetrics states with sum reduction, so DDP runs add up; after
    ``validate`` every rank holds the same :attr:`statistics`.

    Args:
        units: unit kinds to measure (see :mod:`sparse_lightning.units`); all by default.
        ig_steps: integration steps of integrated gradients (0 = skip IG; the paper's
            scripts use 20). All captured layers are scaled together at each step.
        run_name: when set, rank 0 writes ``<dirpath>/<run_name>.safetensors`` at the end.
        dirpath: folder of the checkpoint.
        dataset: a description of the calibration data, stored in the checkpoint.
        allocations: measured byte-budget allocations to add to the statistics at the end
            (``"greedy"``, ``"attribution"``; see
            :mod:`~sparse_lightning.inference.allocation_search`), on rank 0's first
            ``allocation_batches`` batches. Needs every channel kind in ``units``.
        allocation_batches: batches the allocation search runs on.

    Example:
        >>> calibration = AttributionCalibration(ig_steps=4)
        >>> trainer = L.Trainer(accelerator="cpu", callbacks=[calibration])  # doctest: +SKIP
        >>> trainer.validate(module, loader)  # doctest: +SKIP
        >>> calibration.statistics.heads.score("corrected_gxo")  # doctest: +SKIP
    """

    def __init__(
        self,
        units: Sequence[str] | None = None,
        ig_steps: int = 0,
        run_name: str | None = None,
        dirpath: str | os.PathLike[str] = DEFAULT_DIR,
        dataset: str = "",
        allocations: Sequence[str] = (),
        allocation_batches: int = 2,
    ) -> None:
        super().__init__()
        self.units = check_kinds(kind_names() if units is None else units)
        unknown = set(allocations) - set(SEARCHED)
        if unknown:
            raise ValueError(f"allocations must be among {SEARCHED}, got {sorted(unknown)}.")
        missing = [k for k in CHANNEL_KINDS if k not in self.units]
        if allocations and missing:
            raise ValueError(
                f"Allocations spread a budget over {CHANNEL_KINDS}; units lacks {missing}."
            )
        if allocation_batches < 1:
            raise ValueError(f"allocation_batches must be >= 1, got {allocation_batches}.")
        self.allocations = tuple(allocations)
        self.allocation_batches = allocation_batches
        self._kept: list[TeacherForcedBatch] = []
        if isinstance(ig_steps, bool) or not isinstance(ig_steps, int):
            # A float would be written into the checkpoint and fail to load later.
            raise TypeError(
                f"ig_steps must be an integer (the number of integration steps), got "
                f"{ig_steps!r} ({type(ig_steps).__name__})."
            )
        if ig_steps < 0:
            raise ValueError(f"ig_steps must be >= 0 (0 disables IG), got {ig_steps}.")
        if run_name is not None and (not run_name.strip() or Path(run_name).name != run_name):
            raise ValueError(
                f"run_name must be a non-empty file name without folders (the checkpoint is "
                f"<dirpath>/<run_name>.safetensors), got {run_name!r}; put folders in dirpath."
            )
        self.ig_steps = ig_steps
        self.run_name = run_name
        self.dirpath = Path(dirpath)
        self.dataset = dataset
        self.checkpoint_path: Path | None = None
        self.sums: dict[str, AttributionSums] = {}
        self.output_sums: SecondMoment | None = None
        self._output_input: Tensor | None = None
        self._output_hook: torch.utils.hooks.RemovableHandle | None = None
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
        capture = self._require_capture()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"The answer loss is {loss_sum.item()} (not finite), so attributions would be "
                "NaN. Check the model's weights and dtype (float16 overflows; use float32 or "
                "bfloat16) and that the batch's token ids are within the vocabulary."
            )
        mask = batch.predict_mask.flatten()
        if self.output_sums is not None and self._output_input is not None:
            x = self._output_input
            self.output_sums.update(x.reshape(-1, x.shape[-1])[mask])
        self._output_input = None  # the IG passes below run the lm_head again
        with gradients_enabled():
            # differentiate() frees the graph before the IG passes build theirs.
            units = differentiate(capture, loss_sum)
            path_mean = self._mean_path_gradient(module, batch, units) if self.ig_steps else None
        for kind in self.units:
            captured = units[kind]
            for layer, (a, g) in enumerate(
                zip(captured.activations, captured.gradients, strict=True)
            ):
                ig = path_mean[kind][layer][mask] if path_mean is not None else None
                self.sums[kind].update(layer, a[mask], g[mask], ig)

    # ------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SparseActivationModule):
            raise TypeError(
                "AttributionCalibration needs a sparse_lightning.SparseActivationModule, got "
                f"{type(pl_module).__name__}; wrap your model: SparseActivationModule(model)."
            )
        arch = pl_module.architecture
        self.sums = {
            kind: AttributionSums(
                kind, arch.depth(kind), arch.units(kind), integrated_gradients=self.ig_steps > 0
            ).to(pl_module.device)
            for kind in self.units
        }
        head = pl_module.model.get_output_embeddings()
        linear = isinstance(head, torch.nn.Linear)
        self.output_sums = SecondMoment(head.in_features).to(pl_module.device) if linear else None
        self._batches = 0
        self._statistics = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        assert isinstance(pl_module, SparseActivationModule)
        for sums in self.sums.values():
            sums.to(pl_module.device).reset()
        self._batches = 0
        self._kept = []
        self._capture = pl_module.start_capture(self.units)
        if self.output_sums is not None:
            self.output_sums.to(pl_module.device).reset()
            head = pl_module.model.get_output_embeddings()
            self._output_hook = head.register_forward_pre_hook(self._keep_output_input)

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
        if self.allocations and len(self._kept) < self.allocation_batches:
            self._kept.append(outputs["batch"].autograd_ready())
        self._batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # compute() is collective under DDP: every rank calls it and gets the global sums.
        units = {kind: sums.compute() for kind, sums in self.sums.items()}
        output = {} if self.output_sums is None else self.output_sums.compute()
        if output:  # torchmetrics squeezes the one-element count
            output["tokens"] = output["tokens"].reshape(1)
        self._statistics = Statistics(
            units,
            ig_steps=self.ig_steps,
            metadata=run_record(pl_module, self.units, self.dataset),
            output=output,
        )
        if self.allocations and trainer.is_global_zero:
            self._statistics.allocations.update(
                search_allocations(
                    pl_module.model,
                    pl_module.architecture,
                    self._statistics,
                    self._kept,
                    pl_module.answer_loss,
                    self.allocations,
                )
            )
        self._kept = []
        if self.run_name is not None and trainer.is_global_zero:
            path = run_path(self.run_name, self.dirpath)
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
        dense: dict[str, CapturedUnits],
    ) -> dict[str, list[Tensor]]:
        # The last integration point is alpha = 1, whose gradients are the dense ones.
        capture = self._require_capture()
        total = {kind: list(units.gradients) for kind, units in dense.items()}
        for alpha in integration_points(self.ig_steps)[:-1].tolist():
            with capture.record(scale=alpha):
                loss = module.answer_loss(batch)
            for kind, units in differentiate(capture, loss).items():
                total[kind] = [t + g for t, g in zip(total[kind], units.gradients, strict=True)]
        return {kind: [t / self.ig_steps for t in grads] for kind, grads in total.items()}

    def _require_capture(self) -> ActivationCapture:
        if self._capture is None or not self.sums:
            raise RuntimeError(
                "attribute() needs the callback set up and the module capturing; it runs inside "
                "trainer.validate with this callback."
            )
        return self._capture

    def _keep_output_input(self, module: torch.nn.Module, args: tuple) -> None:
        self._output_input = args[0].detach()

    def _detach(self, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, SparseActivationModule):
            pl_module.stop_capture()
        self._capture = None
        if self._output_hook is not None:
            self._output_hook.remove()
        self._output_hook = None
        self._output_input = None


#: The metadata that must match for a checkpoint to stand for a new calibration run.
SAME_RUN = ("model_digest", "fingerprint", "targets", "units", "dataset", "ig_steps")


def run_record(
    module: SparseActivationModule, units: Sequence[str], dataset: str
) -> dict[str, str]:
    """What a calibration run was: the checkpoint metadata that says whether it can be reused.

    A run is the same when all of these match (``sparse-lightning sweep`` compares them): the
    model's weights (``model_digest``), the architecture, the targets, the unit kinds and the
    data; ``ig_steps`` is stored beside them by the checkpoint.
    """
    return {
        "targets": module.targets,
        "fingerprint": module.architecture.fingerprint.to_json(),
        "base_model": str(getattr(module.model, "name_or_path", "") or ""),
        "model_digest": weights_digest(module.model),
        "units": json.dumps(list(units)),
        "dataset": dataset,
    }


def run_differences(
    stored: dict[str, str],
    module: SparseActivationModule,
    units: Sequence[str],
    dataset: str,
    ig_steps: int,
) -> list[str]:
    """The :data:`SAME_RUN` fields in which a stored checkpoint's run differs from this one."""
    wanted = {**run_record(module, check_kinds(units), dataset), "ig_steps": str(ig_steps)}
    return [key for key in SAME_RUN if stored.get(key) != wanted[key]]
