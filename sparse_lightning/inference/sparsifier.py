"""``Sparsifier``: installs one sparsity setting on a model and removes it; nothing else does.

Each selector gets one executor per decoder layer, chosen by what the selector decides from
(:data:`EXECUTORS`): masking at the projection input (the reference) or the gate-first MLP
path that skips work at batch-1 decode. The executors sit on the wrapped model itself, so
``model(...)``, ``generate``, pipelines and evaluation harnesses all run sparse.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning.architectures import resolve
    >>> from sparse_lightning.selection import MagnitudeSelector
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> sparsifier = Sparsifier(
    ...     model, resolve(model), {"mlp": MagnitudeSelector(0.5, 37)}, phase="all")
    >>> _ = model(torch.tensor([[1, 2, 3]]))
    >>> round(sparsifier.realized()["mlp"], 3)  # 18 of 37 neurons zeroed per token
    0.486
    >>> sparsifier.remove()
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.attribution.capture import CapturedUnits
from sparse_lightning.inference.executor import Executor
from sparse_lightning.inference.gate import GateExecutor
from sparse_lightning.inference.mask import MaskExecutor
from sparse_lightning.inference.output import KIND as OUTPUT_KIND
from sparse_lightning.inference.output import OutputExecutor
from sparse_lightning.inference.skip import threshold_executor
from sparse_lightning.selection import Selector, StaticSelector, prepare_oracles
from sparse_lightning.selection.modes import PHASES

#: What a selector decides from (``Selector.reads``) -> the executor that applies it.
EXECUTORS: dict[str, Callable[..., Executor]] = {
    "units": MaskExecutor,
    "gate": GateExecutor,
    "threshold": threshold_executor,
}


#: model -> the object that owns it (a wrapper), and model -> the sparsity installed on it. One
#: model carries at most one installation, whoever made it.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, Sparsifier] = weakref.WeakKeyDictionary()


def claim(model: nn.Module, owner: object) -> None:
    """Make ``owner`` the one object that installs sparsity on ``model``.

    Sparsity that another owner installed is removed first (with a warning), so re-running a
    notebook cell or wrapping the same model in a loop never stacks hooks, and a wrapper never
    reports dense while an earlier one's hooks still run.
    """
    _OWNERS[model] = weakref.ref(owner)
    installed = _INSTALLED.get(model)
    if installed is not None and installed.owner is not owner:
        installed.remove()
        warnings.warn(
            "This model already carried sparsity installed by another wrapper; the new one "
            "takes it over (the other's hooks are removed and it no longer changes the model).",
            stacklevel=3,
        )


def owns(model: nn.Module, owner: object) -> bool:
    """Whether ``owner`` is the last object that claimed ``model``."""
    ref = _OWNERS.get(model)
    return ref is not None and ref() is owner


class Sparsifier:
    """The executors of one sparsity setting on one model, and what they zeroed.

    Args:
        model: the wrapped model (it carries the executors until :meth:`remove`).
        architecture: its resolution.
        selectors: unit kind -> selector; kinds left out stay dense.
        owner: the wrapper installing it (see :func:`claim`); the sparsifier itself by default.
        phase: ``"decode"`` (default): forwards of several tokens per sequence (a prompt, no
            past) run dense and single-token decode steps sparse, as the paper and TEAL do;
            inside :meth:`sparse_positions` exactly the given positions are sparse (teacher
            forcing emulates decoding). ``"all"``: every token of every forward is sparse.
        lm_head: the fraction of the output projection's input channels dropped per token
            (each token's largest kept), its ``lm_head_candidates`` largest logits recomputed
            exactly (see :mod:`~sparse_lightning.inference.output`); 0 keeps it dense.
        lm_head_candidates: logits recomputed exactly per token.
        lm_head_rotation: the basis the lm_head drops channels in
            (:func:`~sparse_lightning.inference.output.output_rotation`); ``None``: its
            input's own channels.

    Attributes:
        enabled: ``False`` runs the model dense (see :meth:`paused`).
        gather: executors that can skip work do so on single-token forwards (default);
            ``False`` makes them compute densely and mask: the reference path.
    """

    def __init__(
        self,
        model: nn.Module,
        architecture: ResolvedArchitecture,
        selectors: Mapping[str, Selector],
        owner: object | None = None,
        phase: str = "decode",
        lm_head: float = 0.0,
        lm_head_candidates: int = 64,
        lm_head_rotation: Tensor | None = None,
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}.")
        self.owner = self if owner is None else owner
        claim(model, self.owner)
        self.model = model
        self.architecture = architecture
        self.selectors = dict(selectors)
        self.phase = phase
        self.enabled = True
        self.gather = True
        self._rows = {kind: row for row, kind in enumerate(self.selectors)}
        if lm_head > 0:
            self._rows[OUTPUT_KIND] = len(self._rows)
        self._tally: Tensor | None = None
        self._positions: Tensor | None = None
        # Tokens per sequence of the layer running now, for sites whose input has lost the
        # sequence dimension (OPT flattens batch and sequence before its MLP).
        self._sequence = 0
        self._handles = [
            layer.register_forward_pre_hook(self._note_sequence, with_kwargs=True)
            for layer in architecture.layers
        ]
        self.executors: list[Executor] = [
            EXECUTORS[selector.reads](self, architecture, kind, layer, selector)
            for kind, selector in self.selectors.items()
            for layer in range(architecture.depth(kind))
        ]
        self.output = (
            OutputExecutor(
                self, model.get_output_embeddings(), lm_head, lm_head_candidates, lm_head_rotation
            )
            if lm_head > 0
            else None
        )
        _INSTALLED[model] = self

    @property
    def installed(self) -> bool:
        """Its executors are on the model (not removed, not taken over)."""
        return _INSTALLED.get(self.model) is self

    def remove(self) -> None:
        """Take every executor off the model: it is the plain model again, bit for bit."""
        for executor in self.executors:
            executor.remove()
        self.executors.clear()
        if self.output is not None:
            self.output.remove()
            self.output = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.installed:
            del _INSTALLED[self.model]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run dense inside (e.g. the oracle's own dense pass)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # -------------------------------------------------------------------- which tokens
    def sparse_rows(self, x: Tensor) -> bool | Tensor:
        """Which tokens of a site input ``x`` are sparse (see ``phase``)."""
        if self.phase == "all":
            return True
        tokens = x.numel() // x.shape[-1]
        if self._positions is not None and self._positions.numel() == tokens:
            return self._positions
        per_sequence = x.shape[-2] if x.dim() >= 3 else self._sequence
        return per_sequence == 1

    def output_rows(self, x: Tensor) -> bool | Tensor:
        """:meth:`sparse_rows` for the output projection, whose input may hold only a prompt's
        last position (``logits_to_keep``): a decode step is a forward whose decoder layers
        ran one token per sequence."""
        rows = self.sparse_rows(x)
        if rows is True and self.phase == "decode" and self._positions is None:
            return self._sequence == 1
        return rows

    @contextmanager
    def sparse_positions(self, mask: Tensor) -> Iterator[None]:
        """Inside, forwards of ``mask``'s shape are sparse exactly where ``mask`` is true.

        Teacher forcing of a prompt and its answer emulates decoding with it: the answer's
        tokens (``labels != -100``) are the ones a decode step would have run sparse.
        """
        previous, self._positions = self._positions, mask.reshape(-1).bool()
        try:
            yield
        finally:
            self._positions = previous

    def _note_sequence(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor) and hidden.dim() >= 3:
            self._sequence = hidden.shape[-2]

    # --------------------------------------------------------------------- per-batch masks
    @property
    def needs_batch(self) -> bool:
        """Some selector's masks come from the batch itself (the oracle)."""
        return any(s.needs_batch for s in self.selectors.values())

    def batch_kinds(self) -> tuple[str, ...]:
        """The kinds whose selectors need :meth:`prepare` before each forward."""
        return tuple(k for k, s in self.selectors.items() if s.needs_batch)

    def prepare(self, units: Mapping[str, CapturedUnits]) -> None:
        """Hand the batch's dense activations and gradients to the selectors that need them."""
        prepare_oracles(self.selectors, units)

    def static_masks(self) -> dict[str, Tensor]:
        """Kind -> ``(layers, units)`` keep-masks, when every selector is a fixed set.

        Raises:
            RuntimeError: some selector decides per token (only static masks can be compacted).
        """
        if not self.selectors or not all(
            isinstance(s, StaticSelector) for s in self.selectors.values()
        ):
            raise RuntimeError(
                "Only static masks remove the same units for every token; call "
                "set_sparsity(..., mode='static') before compact()."
            )
        return {kind: s.masks for kind, s in self.selectors.items()}  # type: ignore[attr-defined]

    # --------------------------------------------------------------------------- counting
    def count(self, kind: str, zeroed: Tensor, seen: int | Tensor) -> None:
        """Add ``zeroed`` of ``seen`` unit-tokens to the realized sparsity of ``kind``.

        The tally is a tensor on the activations' device, so counting never waits for a GPU.
        Inside ``torch.compile`` nothing is counted: the counting operations, a few small
        reductions per projection, made compiling a SmolLM2 decode step take 188 s instead
        of 54 s. :meth:`realized` therefore describes eager forwards (measure fidelity and
        realized sparsity eagerly; time the compiled step).
        """
        if torch.compiler.is_compiling():
            return
        if self._tally is None or self._tally.device != zeroed.device:
            self._tally = torch.zeros(len(self._rows), 2, dtype=torch.long, device=zeroed.device)
        row = self._rows[kind]
        self._tally[row, 0] += zeroed
        self._tally[row, 1] += seen

    @property
    def counts(self) -> dict[str, Tensor | None]:
        """Kind -> ``(zeroed, seen)`` unit-tokens since the last :meth:`reset_counts`."""
        return {
            kind: None if self._tally is None else self._tally[row]
            for kind, row in self._rows.items()
        }

    def reset_counts(self) -> None:
        self._tally = None

    def realized(self) -> dict[str, float]:
        """Fraction of unit-tokens zeroed per kind since the last :meth:`reset_counts`."""
        out = {}
        for kind, tally in self.counts.items():
            zeroed, seen = (0, 0) if tally is None else tally.tolist()
            out[kind] = zeroed / seen if seen else 0.0
        return out
