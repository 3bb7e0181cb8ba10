"""Capturing units and their gradients: the one API calibration and the oracle both use.

:class:`ActivationCapture` hooks the input of the projections where the units live and keeps
each unit activation of a forward as a node of the autograd graph, so that one
``torch.autograd.grad`` (:func:`differentiate`) gives the gradient of every layer and unit kind
at once, without allocating any ``param.grad``.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning.architectures import resolve
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).requires_grad_(False)
    >>> with ActivationCapture(resolve(model)) as capture, gradients_enabled():
    ...     with capture.record():
    ...         loss = model(torch.tensor([[1, 2, 3]])).logits.sum()
    ...     units = differentiate(capture, loss)
    >>> [tuple(g.shape) for g in units["heads"].gradients]
    [(3, 4, 8), (3, 4, 8)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.units import UNIT_KINDS, check_kinds, kind_names


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on, even inside Lightning's ``torch.inference_mode()`` validation loop."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class ActivationCapture:
    """Records, during a forward, the input of every site that holds the kinds asked for.

    A site's input feeds one or more projections (q, k and v read the same hidden state); all
    of them get the same recorded tensor, so its gradient sums every path. Kinds that share a
    site (heads and their features) share the recording and differ only in
    :meth:`unit_view`. Hooks are installed while the object is entered as a context manager
    and fire only inside :meth:`record`, so generation and other forwards pass through.

    Args:
        architecture: the resolved model (from :func:`~sparse_lightning.architectures.resolve`).
        kinds: unit kinds to capture (see :mod:`sparse_lightning.units`); all by default.
    """

    def __init__(
        self, architecture: ResolvedArchitecture, kinds: Sequence[str] | None = None
    ) -> None:
        self.architecture = architecture
        self.kinds = check_kinds(kind_names() if kinds is None else kinds, "kinds")
        self.sites = tuple(dict.fromkeys(UNIT_KINDS[k].site for k in self.kinds))
        self.captured: dict[str, list[Tensor | None]] = {}
        self._sources: dict[tuple[str, int], Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._scale = 1.0

    def __enter__(self) -> ActivationCapture:
        for site in self.sites:
            for row in range(len(self.architecture.layers_with(site))):
                hook = self._make_hook(site, row)
                for module in self.architecture.site_modules(site, row):
                    self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @contextmanager
    def record(self, scale: float = 1.0) -> Iterator[ActivationCapture]:
        """Capture the units of the forwards run inside; optionally scale them by ``scale``.

        ``scale`` multiplies every captured activation before the projections use it (the path
        of integrated gradients); the captured tensor is the scaled one, so gradients taken
        with respect to it are ``dF/da`` at ``scale * a``.
        """
        self.clear()
        self._recording, self._scale = True, float(scale)
        try:
            yield self
        finally:
            self._recording, self._scale = False, 1.0
            self._sources.clear()

    def clear(self) -> None:
        """Drop the captured tensors (and the autograd graph they keep alive)."""
        self.captured = {
            site: [None] * len(self.architecture.layers_with(site)) for site in self.sites
        }
        self._sources.clear()

    def tensors(self) -> list[Tensor]:
        """Captured site inputs in a fixed order: every layer of the first site, then the next."""
        flat = [t for site in self.sites for t in self.captured[site]]
        if any(t is None for t in flat):
            raise RuntimeError(
                "Some projections did not run during record(); the model's forward skipped a "
                "layer, or no forward ran inside record()."
            )
        return flat  # type: ignore[return-value]

    def unit_view(self, kind: str, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Reshape site inputs to ``(batch * seq, units, width)`` for ``kind``.

        Some models (OPT) flatten batch and sequence before their MLP; flattening both ways
        gives every architecture the same token order, that of a ``(batch, seq)`` mask.
        """
        units = self.architecture.units(kind)
        width = self.architecture.unit_width(kind)
        return [t.reshape(-1, units, width) for t in tensors]

    def by_kind(self, tensors: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """Split a :meth:`tensors`-ordered list per unit kind, each as :meth:`unit_view`."""
        per_site, start = {}, 0
        for site in self.sites:
            stop = start + len(self.architecture.layers_with(site))
            per_site[site], start = tensors[start:stop], stop
        return {kind: self.unit_view(kind, per_site[UNIT_KINDS[kind].site]) for kind in self.kinds}

    def _make_hook(self, site: str, layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not self._recording:
                return None
            x = args[0]
            recorded = self.captured[site][layer]
            if recorded is not None and self._sources.get((site, layer)) is x:
                # Another projection reading the same input (k and v after q): same tensor.
                return (recorded, *args[1:])
            self._sources[(site, layer)] = x
            if not x.requires_grad:
                # Frozen weights: nothing upstream needs a gradient, so the graph starts here.
                x = x.detach().requires_grad_()
            if self._scale != 1.0:
                x = x * self._scale
            self.captured[site][layer] = x
            return (x, *args[1:])

        return hook


@dataclass
class CapturedUnits:
    """One unit kind's activations and loss gradients, per layer ``(tokens, units, width)``."""

    activations: list[Tensor]
    gradients: list[Tensor]


def differentiate(capture: ActivationCapture, loss: Tensor) -> dict[str, CapturedUnits]:
    """Gradients of ``loss`` with respect to every unit recorded by ``capture``, per kind.

    Call it right after the forward run inside ``capture.record()`` (under
    :func:`gradients_enabled`); it frees the recorded graph, so integrated-gradients passes can
    record again.
    """
    tensors = capture.tensors()
    grads = torch.autograd.grad(loss, tensors)
    acts = capture.by_kind([t.detach() for t in tensors])
    by_kind = capture.by_kind(grads)
    capture.clear()
    return {kind: CapturedUnits(acts[kind], by_kind[kind]) for kind in capture.kinds}
