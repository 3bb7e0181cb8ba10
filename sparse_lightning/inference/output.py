"""The output projection (lm_head) with a sparse input and its top candidates recomputed exactly.

The lm_head is the largest single weight a decode step streams (21% of SmolLM2-135M's bytes,
28% of Qwen2.5-0.5B's) and the most sensitive input to drop channels from: alone, dropping
half of its input channels per token keeps the dense top-1 token only 76% of the time on
SmolLM2. But the logits that decide the next token are few. So a decode step here

1. computes approximate logits from each token's ``keep`` input channels of largest magnitude
   (the compiled kernel reads only those rows of the weight stored transposed), then
2. recomputes the ``candidates`` largest approximate logits exactly and writes them over the
   approximations.

Greedy decoding then picks the dense model's token whenever it is among the candidates (the
approximation only has to rank it in the top ``candidates``), and the distribution differs from
dense only in the tail's logits, which KL measures.

Two bases (``lm_head_basis``):

* ``"channels"``: the input's own channels. The weight is stored transposed once (a tied input
  embedding reads the same storage through a view) and the exact values add the dropped
  channels' weights of the candidates' columns (``input_sparse_logits``, one compiled call).
* ``"rotated"`` (what ``"auto"`` picks when the checkpoint holds the lm_head input's second
  moment): channels of the input's calibrated eigenbasis ``Q`` (:func:`output_rotation`), where
  a token's energy sits in fewer channels (LaRoSA's per-layer rotation, applied here where it
  costs one small ``x @ Q`` and no change to the model). The approximation reads the kept rows
  of ``(W Q)^T``, a copy stored in bfloat16 (it only ranks candidates: on SmolLM2 and Qwen the
  dense token's recall and KL are the same as in float32), and the exact values are dot
  products with the weight's own rows (``rotated_logits``). Dropping 80% of the rotated input
  gives the dense token as often as dropping 50% of the plain channels (on held-out
  TruthfulQA answers, ``benchmarks/lm_head_basis.py``: SmolLM2 99.8 against 100%, Qwen 99.96
  against 100%) and reads a quarter of the bytes. The cost is memory: the copy is half the
  lm_head's size.

Forwards with several tokens (a prompt) run dense; teacher forcing masks the input and
recomputes the candidates from the dense logits: the reference the kernel path must equal.
:meth:`OutputExecutor.remove` puts the model back, bit for bit.

Example:
    >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
    ...     model, "checkpoints/run.safetensors", budget=0.2, lm_head=0.8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparse_lightning.attribution.statistics import Statistics
from sparse_lightning.inference.executor import restrict
from sparse_lightning.kernels import load_logits, load_rotated, transposed_rows
from sparse_lightning.kernels.ops import top_k_channels
from sparse_lightning.selection.selectors import kept_count

#: The realized-sparsity key of the lm_head input (beside the unit kinds).
KIND = "lm_head"
#: Bytes read per candidate weight of the channel basis: each sits in its own cache line of the
#: transposed weight.
CACHE_LINE = 64
#: What the rotated approximation's copy of a float32 weight is stored in.
APPROXIMATION_DTYPE = torch.bfloat16


def candidate_macs(candidates: int, dropped: float, element_size: int) -> int:
    """Weight reads of the channel basis's exact recomputation, in multiply-adds of the element
    size: one cache line per candidate weight of each of the ``dropped`` input channels (the
    kept ones are in the approximation already), since a candidate's weights are a column of
    the transposed layout, not a contiguous row."""
    return round(candidates * dropped * max(1, CACHE_LINE // element_size))


@dataclass(frozen=True)
class OutputReads:
    """What a sparse lm_head reads per decode token, for the byte accounting.

    Attributes:
        candidates: logits recomputed exactly.
        rotated: the rotated basis (else the input's own channels).
        approximation_size: bytes per weight of the copy the rotated approximation reads.
    """

    candidates: int
    rotated: bool = False
    approximation_size: int = 2

    def skipped_macs(
        self, zero_ratio: float, inputs: int, outputs: int, element_size: int
    ) -> float:
        """Weight reads saved per decode token against the dense lm_head (``inputs x
        outputs`` weights of ``element_size`` bytes), in multiply-adds of that size, when a
        fraction ``zero_ratio`` of its (rotated) input channels is dropped."""
        if not self.rotated:
            dropped = zero_ratio * inputs
            return zero_ratio * inputs * outputs - candidate_macs(
                self.candidates, dropped, element_size
            )
        share = self.approximation_size / element_size
        read = (1 - zero_ratio) * inputs * outputs * share + inputs * inputs
        return inputs * outputs - read - self.candidates * inputs


def output_rotation(statistics: Statistics | None, basis: str) -> Tensor | None:
    """The rotation ``Q`` of the lm_head's input for ``basis`` (``"auto"``, ``"rotated"`` or
    ``"channels"``, see :class:`~sparse_lightning.selection.SparsityConfig`); ``None``: its
    own channels.

    ``Q``'s columns are the eigenvectors of the calibrated second moment ``sum x x^T`` (float64):
    the orthonormal basis in which the calibration tokens' inputs concentrate their energy.

    Raises:
        ValueError: ``"rotated"`` without the second moment.
    """
    moment = None if statistics is None else statistics.output.get("second_moment")
    if basis == "channels" or (basis == "auto" and moment is None):
        return None
    if moment is None:
        raise ValueError(
            "lm_head_basis='rotated' needs the lm_head input's second moment, which "
            + (
                "this module has no statistics for: load a checkpoint (from_pretrained)"
                if statistics is None
                else "this checkpoint lacks (calibrated before format /3): recalibrate"
            )
            + ", or use lm_head_basis='channels'."
        )
    return torch.linalg.eigh(moment.double()).eigenvectors


class OutputExecutor:
    """Sparse-input lm_head with exact candidates; see the module docstring.

    Args:
        owner: the :class:`~sparse_lightning.inference.sparsifier.Sparsifier` (its
            ``enabled``, ``gather``, :meth:`output_rows` and ``count``).
        head: the model's output projection (``model.get_output_embeddings()``), a
            ``nn.Linear``.
        level: the fraction of input channels dropped per token, in ``[0, 1)``.
        candidates: logits recomputed exactly per token (at least 1).
        rotation: ``(in, in)`` orthonormal columns (:func:`output_rotation`) to drop channels
            in; ``None``: the input's own channels.
    """

    def __init__(
        self,
        owner,
        head: nn.Module,
        level: float,
        candidates: int,
        rotation: Tensor | None = None,
    ) -> None:
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"lm_head sparsity needs an nn.Linear output projection, got "
                f"{type(head).__name__}; leave lm_head=0 for this model."
            )
        if rotation is not None and rotation.shape != (head.in_features, head.in_features):
            raise ValueError(
                f"The lm_head rotation must be ({head.in_features}, {head.in_features}), got "
                f"{tuple(rotation.shape)}: statistics of another model?"
            )
        self.owner, self.head = owner, head
        self.units = head.in_features
        self.keep = kept_count(self.units, level)
        self.candidates = min(candidates, head.out_features)
        self.bias = None if head.bias is None else head.bias.detach()
        weight = head.weight.detach()
        with torch.no_grad():
            if rotation is None:
                self.rotation = None
                self.op = load_logits()
                self.weight_t = transposed_rows([weight.t()])
                head.weight.data = self.weight_t.t()  # a tied embedding reads the same storage
            else:
                self.rotation = rotation.to(weight.dtype)
                self.op = load_rotated()
                narrow = APPROXIMATION_DTYPE if weight.dtype == torch.float32 else weight.dtype
                self.weight_t = transposed_rows([(weight @ self.rotation).t().to(narrow)])
        self.reads = OutputReads(
            self.candidates, rotation is not None, self.weight_t.element_size()
        )
        self._original = head.forward
        head.forward = self._forward

    def remove(self) -> None:
        """Put the original forward and weight layout back (the same values, bit for bit)."""
        if self.head.__dict__.get("forward") is not None:
            del self.head.forward
        self.head.weight.data = self.head.weight.data.contiguous()

    def _forward(self, x: Tensor) -> Tensor:
        if not self.owner.enabled:
            return self._original(x)
        rows = self.owner.output_rows(x)
        if rows is False:
            return self._original(x)
        tokens = x.numel() // x.shape[-1]
        if self.owner.gather and tokens == 1 and rows is True and not x.requires_grad:
            return self._decode(x)
        dense = self._original(x)
        flat = x.reshape(tokens, self.units)
        if self.rotation is not None:
            flat = flat @ self.rotation
        keep, zeroed, seen = restrict(top_k_channels(flat, self.keep), rows, tokens)
        self.owner.count(KIND, zeroed=zeroed, seen=seen)
        masked = flat * keep.to(x.dtype)
        if self.rotation is None:
            approx = self._original(masked.reshape(x.shape))
        else:
            approx = (masked @ self.weight_t.to(x.dtype)).reshape(dense.shape)
            approx = approx if self.bias is None else approx + self.bias
        index = approx.topk(self.candidates, dim=-1).indices
        exact = approx.scatter(-1, index, dense.gather(-1, index))
        if rows is True:
            return exact
        return torch.where(rows.reshape(*x.shape[:-1], 1), exact, dense)

    def _decode(self, x: Tensor) -> Tensor:
        """One token: approximate logits and exact candidates, in one call of the kernel."""
        if not torch.compiler.is_compiling():
            self.owner.count(KIND, zeroed=torch.tensor(self.units - self.keep), seen=self.units)
        if self.rotation is None:
            return self.op(x, self.weight_t, self.keep, self.candidates, self.bias)
        weight = self.head.weight
        return self.op(
            x @ self.rotation, self.weight_t, self.keep, self.candidates, x, weight, self.bias
        )
