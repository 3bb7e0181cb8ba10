"""Evaluate a tiny model on N CPU processes (gloo) and save every rank's QA metrics.

Run by tests/test_ddp.py as a script (Lightning's "ddp" strategy re-runs the launching script).

    python tests/ddp_evaluate.py DEVICES OUT_DIR [DATA_JSONL]

Without DATA_JSONL it evaluates rows 32-39 of the packaged demo set; with it, rows 0-7 of that
file (e.g. one whose multiple-choice questions all land on one rank).
"""

import json
import sys
from pathlib import Path

import torch
from conftest import char_tokenizer, quiet_trainer, tiny_model

from sparse_lightning import QADataModule, QAEvaluation, SparseActivationModule, SparsityConfig


def main(devices: int, out_dir: Path, data: str | None = None) -> None:
    tokenizer = char_tokenizer()
    model = tiny_model("llama")
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    module = SparseActivationModule(model, tokenizer, targets="dense", max_new_tokens=4)
    # Batch size 1: every example is computed alone, whichever rank gets it.
    rows = (32, 40) if data is None else (0, 8)
    data_module = QADataModule(
        data or "demo", "generic", calibration_rows=(8, 9), evaluation_rows=rows, batch_size=1
    )
    settings = [SparsityConfig(), SparsityConfig(mlp=0.5, heads=0.5, mode="magnitude")]
    evaluation = QAEvaluation(settings)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = quiet_trainer(devices=devices, strategy=strategy, callbacks=[evaluation])
    trainer.test(module, datamodule=data_module, verbose=False)
    path = out_dir / f"eval_devices{devices}_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(evaluation.results))
    # Gloo's threads must be joined before the interpreter exits: left to exit, a rank
    # sometimes aborted ("terminate called without an active exception") after its work.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
