"""Forward pre-hooks at the input of the output projections, where the units live.

:class:`ActivationCapture` keeps each unit activation of a forward as a node of the autograd
graph so that one ``torch.autograd.grad`` gives the gradient of every layer and unit kind at
once, without allocating any ``param.grad``.

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
    ...     grads = torch.autograd.grad(loss, capture.tensors())
    >>> [tuple(t.shape) for t in capture.unit_view("heads", grads[2:4])]
    [(3, 4, 8), (3, 4, 8)]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from sparse_lightning.architectures import UNIT_KINDS, ResolvedArchitecture
from sparse_lightning.selectors import GateSelector, Selector
from sparse_lightning.skipping import GateSkipping


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on, even inside Lightning's ``torch.inference_mode()`` validation loop."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class ActivationCapture:
    """Records the inputs of the MLP and attention output projections during a forward.

    Hooks are installed while the object is entered as a context manager and fire only inside
    :meth:`record`, so generation and other forwards in between pass through untouched.

    Args:
        architecture: the resolved model (from :func:`~sparse_lightning.architectures.resolve`).
        kinds: unit kinds to capture, ``"mlp"`` and/or ``"heads"``.
    """

    def __init__(
        self, architecture: ResolvedArchitecture, kinds: Sequence[str] = UNIT_KINDS
    ) -> None:
        unknown = set(kinds) - set(UNIT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {UNIT_KINDS}, got {kinds}.")
        self.architecture = architecture
        self.kinds = tuple(k for k in UNIT_KINDS if k in kinds)
        self.captured: dict[str, list[Tensor | None]] = {}
        self._handles: list[RemovableHandle] = []
        self._recording = False
        self._scale = 1.0

    def __enter__(self) -> ActivationCapture:
        for kind in self.kinds:
            for layer, module in enumerate(self.architecture.out_modules(kind)):
                hook = self._make_hook(kind, layer)
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

        ``scale`` multiplies every captured activation before the projection uses it (the path
        of integrated gradients); the captured tensor is the scaled one, so gradients taken
        with respect to it are ``dF/da`` at ``scale * a``.
        """
        self.clear()
        self._recording, self._scale = True, float(scale)
        try:
            yield self
        finally:
            self._recording, self._scale = False, 1.0

    def clear(self) -> None:
        """Drop the captured tensors (and the autograd graph they keep alive)."""
        self.captured = {
            kind: [None] * len(self.architecture.out_modules(kind)) for kind in self.kinds
        }

    def tensors(self) -> list[Tensor]:
        """Captured tensors in a fixed order: every layer of ``mlp``, then of ``heads``."""
        flat = [t for kind in self.kinds for t in self.captured[kind]]
        if any(t is None for t in flat):
            raise RuntimeError(
                "Some output projections did not run during record(); the model's forward "
                "skipped a layer, or no forward ran inside record()."
            )
        return flat  # type: ignore[return-value]

    def unit_view(self, kind: str, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Reshape projection inputs to ``(batch * seq, units, width)``.

        Some models (OPT) flatten batch and sequence before their MLP; flattening both ways
        gives every architecture the same token order, that of a ``(batch, seq)`` mask.
        """
        units = self.architecture.units(kind)
        width = self.architecture.unit_width(kind)
        return [t.reshape(-1, units, width) for t in tensors]

    def by_kind(self, tensors: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """Split a :meth:`tensors`-ordered list per unit kind, each as :meth:`unit_view`."""
        out, offset = {}, 0
        for kind in self.kinds:
            n = self.architecture.num_layers
            out[kind] = self.unit_view(kind, tensors[offset : offset + n])
            offset += n
        return out

    def _make_hook(self, kind: str, layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not self._recording:
                return None
            x = args[0]
            if not x.requires_grad:
                # Frozen weights: nothing upstream needs a gradient, so the graph starts here.
                x = x.detach().requires_grad_()
            if self._scale != 1.0:
                x = x * self._scale
            self.captured[kind][layer] = x
            return (x, *args[1:])

        return hook


class UnitMasking:
    """Zero the units a selector drops, at the input of the output projections.

    Installed on the wrapped model itself, so ``model(...)``, ``model.generate``, pipelines and
    evaluation harnesses all run sparse. Counts what it zeroes (see :meth:`realized`). A
    :class:`~sparse_lightning.selectors.GateSelector` decides before the MLP's projections run,
    so its layers get :class:`~sparse_lightning.skipping.GateSkipping` instead of a hook.

    Args:
        architecture: the resolved model.
        selectors: unit kind -> selector; kinds left out stay dense.

    Attributes:
        gather: with a gate selector, cut the projections to the kept neurons on single-token
            forwards (default). ``False`` computes densely and masks: the reference.
    """

    def __init__(self, architecture: ResolvedArchitecture, selectors: dict[str, Selector]) -> None:
        self.architecture = architecture
        self.selectors = selectors
        self.enabled = True
        self.gather = True
        self.counts: dict[str, Tensor | None] = dict.fromkeys(selectors)
        self._handles: list[RemovableHandle | GateSkipping] = []
        for kind, selector in selectors.items():
            for layer, module in enumerate(architecture.out_modules(kind)):
                if isinstance(selector, GateSelector):
                    self._handles.append(GateSkipping(self, architecture, layer, selector))
                else:
                    hook = self._make_hook(kind, layer)
                    self._handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run dense inside (e.g. the oracle's own dense pass)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def count(self, kind: str, zeroed: Tensor, seen: int) -> None:
        """Add ``zeroed`` of ``seen`` unit-tokens to the realized sparsity of ``kind``.

        The tally is a tensor on the activations' device, so counting neither waits for a GPU
        nor changes a Python number that a ``torch.compile`` graph would be specialised on.
        """
        tally = self.counts[kind]
        if tally is None or tally.device != zeroed.device:
            tally = self.counts[kind] = torch.zeros(2, dtype=torch.long, device=zeroed.device)
        tally[0] += zeroed
        tally[1] += seen

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.selectors)

    def realized(self) -> dict[str, float]:
        """Fraction of unit-tokens zeroed per kind since the last :meth:`reset_counts`."""
        out = {}
        for kind, tally in self.counts.items():
            zeroed, seen = (0, 0) if tally is None else tally.tolist()
            out[kind] = zeroed / seen if seen else 0.0
        return out

    def _make_hook(self, kind: str, layer: int):
        units = self.architecture.units(kind)
        width = self.architecture.unit_width(kind)
        selector = self.selectors[kind]

        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if not self.enabled:
                return None
            x = args[0]
            view = x.reshape(-1, units, width)
            keep = selector.keep(layer, view)
            tokens = view.shape[0]
            kept = keep.sum() * (tokens if keep.dim() == 1 else 1)
            self.count(kind, zeroed=tokens * units - kept, seen=tokens * units)
            masked = view * keep.unsqueeze(-1).to(x.dtype)
            return (masked.reshape(x.shape), *args[1:])

        return hook
