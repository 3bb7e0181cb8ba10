"""Does a weight-aware channel score keep more fidelity than magnitude at equal bytes?

TEAL keeps an input channel ``j`` of a linear layer when ``|x_j|`` is large; WINA (Chen et al.
2025) when ``|x_j| * ||W[:, j]||`` is, the channel's contribution to the output bound; SCAP-style
centring (Chua et al. 2024) when ``|x_j - mu_j|`` is, ``mu_j`` the channel's mean over the answer
tokens of calibration questions (400-463), and a dropped channel then contributes ``mu_j``
instead of 0 (``W mu`` folds into a bias, so the kernel would still skip its row); rotated keeps
the largest coordinates of ``x`` in the eigenbasis ``Q`` of its calibrated second moment (the
same questions) and computes with ``Q Q_kept^T x``, as the lm_head's rotated basis does (a
decoder site would pay for reading ``Q`` on top of its weight). All are run here at *equal
bytes*: each token keeps exactly the same number of channels at every site
(per-token top-k, one level for every channel kind and layer, so neither score gets a byte more
than the other), with the prompt dense and the answer's tokens sparse as decoding runs them,
on the dense model's own greedy answers to TruthfulQA questions (from 0, not used for
calibration). A second table sparsifies only the input of the output projection (lm_head),
the one linear layer the channel kinds leave dense.

    python benchmarks/channel_scores.py [--model smollm2|qwen] [--questions 24] [--scores ...]

Prints the tables and writes benchmarks/results/channel_scores[_qwen].json (with machine info).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import TRUTHFULQA, results_path, save_report  # noqa: E402
from benchmarks.selection_quality import MODELS  # noqa: E402
from sparse_lightning import QACollator, SparseActivationModule, load_truthfulqa  # noqa: E402
from sparse_lightning.data.teacher_forcing import IGNORE  # noqa: E402
from sparse_lightning.selection.allocation import CHANNEL_KINDS  # noqa: E402
from sparse_lightning.selection.selectors import kept_count, top_k_mask  # noqa: E402
from sparse_lightning.units import UNIT_KINDS  # noqa: E402

SCORES = ("magnitude", "wina", "centred", "rotated")
#: Calibration questions whose answer tokens give the centred score its channel means and the
#: rotated score its second moments.
CALIBRATION = range(400, 464)


class TopK:
    """Per-token top-k masking at the inputs of projections, by one of :data:`SCORES`."""

    def __init__(self) -> None:
        self.level, self.score, self.positions = 0.0, "magnitude", None
        self.collecting = False  # True: sum the inputs (for the means), mask nothing
        self.handles: list = []

    def attach(self, projections: tuple[torch.nn.Module, ...]) -> None:
        # One column norm over every projection reading the input: the fused row the kernel
        # reads for channel j holds all of them.
        norms = torch.cat([p.weight for p in projections]).norm(dim=0).detach()
        width = norms.shape[0]
        sums = {
            "sum": torch.zeros(width),
            "moment": torch.zeros(width, width, dtype=torch.float64),
            "count": 0,
        }
        for projection in projections:
            hook = self._hook(norms, sums, first=projection is projections[0])
            self.handles.append(projection.register_forward_pre_hook(hook))

    def _hook(self, norms: Tensor, sums: dict, first: bool):
        def mask(module, args):
            x = args[0]
            if self.collecting:
                if first:  # each input once, though several projections read it
                    answer = x[self.positions]
                    sums["sum"] += answer.sum(0)
                    sums["moment"] += answer.double().T @ answer.double()
                    sums["count"] += answer.shape[0]
                return None
            if self.level <= 0:
                return None
            if self.score == "rotated":
                if "basis" not in sums:  # eigh is the same for every level: once per site
                    sums["basis"] = torch.linalg.eigh(sums["moment"])[1].float()
                basis = sums["basis"]
                y = x @ basis
                keep = top_k_mask(y.abs(), kept_count(x.shape[-1], self.level))
                kept = torch.where(keep, y, torch.zeros_like(y)) @ basis.T
                return (torch.where(self.positions.unsqueeze(-1), kept, x), *args[1:])
            if self.score == "centred":
                mean = sums["sum"] / max(sums["count"], 1)
                score, dropped = (x - mean).abs(), mean.expand_as(x)
            else:
                score = x.abs() * norms if self.score == "wina" else x.abs()
                dropped = torch.zeros_like(x)
            keep = top_k_mask(score, kept_count(x.shape[-1], self.level))
            keep |= ~self.positions.unsqueeze(-1)  # the prompt stays dense
            return (torch.where(keep, x, dropped), *args[1:])

        return mask

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def answer_log_probs(model, batch) -> Tensor:
    """Log-probabilities at the answer-predicting positions of a teacher-forced batch."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(logits[batch.predict_mask].float(), -1)


def agreement(model, batches, dense, masker: TopK) -> tuple[float, float]:
    """Top-1 agreement and KL(dense || sparse) over the answer-predicting positions."""
    agree = kl = tokens = 0.0
    for batch, reference in zip(batches, dense, strict=True):
        masker.positions = batch.labels != IGNORE
        logp = answer_log_probs(model, batch)
        agree += float((logp.argmax(-1) == reference.argmax(-1)).sum())
        kl += float((reference.exp() * (reference - logp)).sum())
        tokens += reference.shape[0]
    return agree / tokens, kl / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--questions", type=int, default=24, help="TruthfulQA rows from 0")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.35])
    parser.add_argument("--lm-head-levels", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or results_path("channel_scores", args.model)
    started = time.time()
    name, load = MODELS[args.model]
    model, tokenizer = load()
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=32)

    def answered(rows: range) -> list:  # the dense model's greedy answers, teacher-forced
        questions = load_truthfulqa(TRUTHFULQA, rows=rows)
        loader = DataLoader(questions, batch_size=8, collate_fn=QACollator(tokenizer))
        return [module.prepare_batch(raw) for raw in loader]

    batches, calibration = answered(range(args.questions)), answered(CALIBRATION)
    dense = [answer_log_probs(model, b) for b in batches]
    architecture = module.architecture
    rows = []
    for where, levels in (("channel kinds", args.levels), ("lm_head", args.lm_head_levels)):
        masker = TopK()
        if where == "lm_head":
            masker.attach((model.get_output_embeddings(),))
        else:
            for kind in CHANNEL_KINDS:
                site = UNIT_KINDS[kind].site
                for row in range(architecture.depth(kind)):
                    masker.attach(architecture.site_modules(site, row))
        masker.collecting = True
        with torch.no_grad():
            for batch in calibration:
                masker.positions = batch.labels != IGNORE
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        masker.collecting = False
        for level in levels:
            for score in args.scores:
                masker.level, masker.score = level, score
                top1, kl = agreement(model, batches, dense, masker)
                rows.append(
                    {
                        "sparsified": where,
                        "level": level,
                        "score": score,
                        "top1_agreement": top1,
                        "kl": kl,
                    }
                )
                print(
                    f"{where:13} level {level:.2f} {score:9} top-1 {top1:.3f} KL {kl:.3f}",
                    flush=True,
                )
        masker.detach()
    save_report(
        {
            "benchmark": "channel_scores",
            "model": name,
            "evaluation": f"TruthfulQA rows 0-{args.questions - 1}, dense greedy answers "
            "teacher-forced, prompt dense",
            "centring_means": f"answer tokens of TruthfulQA rows {CALIBRATION.start}-"
            f"{CALIBRATION.stop - 1}",
            "answer_tokens": int(sum(d.shape[0] for d in dense)),
            "seconds": time.time() - started,
            "results": rows,
        },
        out,
    )


if __name__ == "__main__":
    main()
