"""Calibrate a tiny model on N CPU processes (gloo) and save every rank's statistics.

Run by tests/test_ddp.py as a script, because Lightning's "ddp" strategy starts the other
ranks by re-running the script that created the Trainer.

    python tests/ddp_calibrate.py DEVICES OUT_DIR
"""

import sys
from pathlib import Path

import torch
from conftest import loader_of, quiet_trainer, tiny_model, token_pairs
from safetensors.torch import save_file

from sparse_lightning import AttributionCalibration, SparseActivationModule


def main(devices: int, out_dir: Path) -> None:
    callback = AttributionCalibration(ig_steps=2)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = quiet_trainer(devices=devices, strategy=strategy, callbacks=[callback])
    module = SparseActivationModule(tiny_model("llama"), targets="dense", max_new_tokens=5)
    # Batch size 1: every example is computed alone, whichever rank gets it.
    trainer.validate(module, loader_of(token_pairs(8), batch_size=1), verbose=False)
    rank = trainer.global_rank
    save_file(
        callback.statistics.tensors(), str(out_dir / f"devices{devices}_rank{rank}.safetensors")
    )
    # Gloo's threads must be joined before the interpreter exits (see ddp_evaluate.py).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
