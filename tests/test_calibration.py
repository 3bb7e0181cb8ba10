"""Calibration through trainer.validate, checked against independent references.

References here never go through sparse_lightning's hooks, functional module or loss: they use
their own hooks on literal module names, their own cross-entropy and plain autograd.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import (
    ARCH_TYPES,
    calibrate,
    loader_of,
    quiet_trainer,
    reference_batch,
    summed_answer_ce,
    tiny_model,
    token_pairs,
)

from sparse_lightning import AttributionCalibration, SparseActivationModule

# Literal module names, independent of sparse_lightning.architectures.
MODULE_NAMES = {
    "llama": ("model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj"),
    "qwen2": ("model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj"),
    "phi": ("model.layers.{}.mlp.fc2", "model.layers.{}.self_attn.dense"),
    "gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention.dense"),
    "opt": ("model.decoder.layers.{}.fc2", "model.decoder.layers.{}.self_attn.out_proj"),
}


def hand_activations_and_gradients(model, pairs, names, layers=2):
    """(a, g) at the input of each named projection, from plain autograd on summed answer CE."""
    model = copy.deepcopy(model).requires_grad_(False)
    store = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            store[name] = args[0]

        return hook

    handles = [
        model.get_submodule(pattern.format(i)).register_forward_pre_hook(keep((kind, i)))
        for kind, pattern in zip(("mlp", "heads"), names, strict=True)
        for i in range(layers)
    ]
    handles.append(
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    )
    ids, mask, labels = reference_batch(pairs)
    summed_answer_ce(model, ids, mask, labels).backward()
    for handle in handles:
        handle.remove()
    predict = torch.zeros_like(labels, dtype=torch.bool)
    predict[:, :-1] = labels[:, 1:] != -100
    predict = predict.flatten()  # OPT feeds its MLP (batch * seq, features)
    return {
        k: (v.detach().flatten(0, -2)[predict].double(), v.grad.flatten(0, -2)[predict].double())
        for k, v in store.items()
    }


@pytest.mark.parametrize("inference_mode", [True, False])
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_every_architecture_calibrates_without_touching_weights(model_type, inference_mode):
    model = tiny_model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, _, _ = calibrate(
        model,
        loader_of(token_pairs(5)),
        targets="dense",
        inference_mode=inference_mode,
        ig_steps=2,
    )
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters())
    assert stats.tokens > 0
    for kind, units in (("mlp", 37), ("heads", 4)):
        for name, value in stats[kind].sums.items():
            assert value.shape == (2, units), (kind, name)
            assert torch.isfinite(value).all(), (kind, name)
            # Every layer got a non-zero contribution.
            assert (value.abs().sum(1) > 0).all(), (kind, name)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi", "gpt2", "gpt_neox", "opt"])
def test_metrics_equal_hand_computation_from_autograd(model_type):
    model = tiny_model(model_type)
    pairs = token_pairs(5)
    stats, _, _ = calibrate(model, loader_of(pairs, batch_size=2), ig_steps=0)
    hand = hand_activations_and_gradients(model, pairs, MODULE_NAMES[model_type])
    tokens = sum(len(a) for _, a in pairs)
    assert stats.mlp.tokens == stats.heads.tokens == tokens
    for (kind, layer), (a, g) in hand.items():
        if kind == "heads":  # (N, H*hd) -> (N, H, hd): one slice per query head, GQA or not
            a, g = a.view(tokens, 4, 8), g.view(tokens, 4, 8)
            mag, ga, gsum = a.norm(dim=-1), (g * a).sum(-1), g.sum(-1)
            sq_a, sq_g = (a * a).sum(-1), (g * g).sum(-1)
            gnorm = g.reshape(tokens, -1).norm(dim=-1, keepdim=True)
        else:
            mag, ga, gsum, sq_a, sq_g = a.abs(), g * a, g, a * a, g * g
            gnorm = g.norm(dim=-1, keepdim=True)
        expected = {
            "magnitude": mag.sum(0),
            "sq_magnitude": sq_a.sum(0),
            "gradient": gsum.sum(0),
            "sq_gradient": sq_g.sum(0),
            "gxo": (-ga).sum(0),
            "snip": ga.abs().sum(0),
            "fisher": (ga**2).sum(0),
            "corrected_gxo": (-ga + 0.5 * mag * gnorm).sum(0),
        }
        for name, value in expected.items():
            torch.testing.assert_close(
                stats[kind].sums[name][layer],
                value,
                rtol=1e-4,
                atol=1e-8,
                msg=f"{model_type} {kind} layer {layer} {name}",
            )
        torch.testing.assert_close(
            stats[kind].layer_grad_norm[layer], gnorm.sum(), rtol=1e-4, atol=1e-8
        )


def test_gxo_ranks_units_like_true_ablation():
    """Setup: tiny Llama (default init, std 0.02, so activations are small and the loss is
    close to linear in each unit), reference targets, 8 examples. For every MLP neuron of both
    layers, zero it at the answer-predicting positions (own hook) and measure the true rise of
    the summed answer CE; GxO's first-order estimate must rank neurons the same way."""
    model = tiny_model("llama")
    pairs = token_pairs(8, answer_len=5)
    stats, _, _ = calibrate(model, loader_of(pairs, batch_size=4), units=("mlp",))
    ids, mask, labels = reference_batch(pairs)
    predict = torch.zeros_like(labels, dtype=torch.bool)
    predict[:, :-1] = labels[:, 1:] != -100
    with torch.no_grad():
        base = summed_answer_ce(model, ids, mask, labels)
        for layer in range(2):
            proj = model.get_submodule(f"model.layers.{layer}.mlp.down_proj")
            true_rise = []
            for unit in range(37):

                def zero_unit(module, args, unit=unit):
                    x = args[0].clone()
                    x[..., unit] = torch.where(predict, 0.0, x[..., unit])
                    return (x,)

                handle = proj.register_forward_pre_hook(zero_unit)
                true_rise.append((summed_answer_ce(model, ids, mask, labels) - base).item())
                handle.remove()
            rho = spearman(torch.tensor(true_rise), stats.mlp.sums["gxo"][layer].float())
            assert rho >= 0.9, f"layer {layer}: Spearman {rho:.3f}"


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_ig_with_one_step_is_gxo():
    stats, _, _ = calibrate(tiny_model("llama"), loader_of(token_pairs(4)), ig_steps=1)
    for kind in ("mlp", "heads"):
        assert torch.equal(stats[kind].sums["integrated_gradients"], stats[kind].sums["gxo"])


def test_ig_converges_to_the_exact_path_integral():
    """One decoder layer, MLP neurons only: scaling the neurons does not change their own
    input, so the path a(alpha) = alpha * a is a straight line and IG is exact in the limit.
    The reference integrates with its own hook (512 midpoints) and is itself checked against
    the completeness identity: summed over units and all positions it equals F(0) - F(a)."""
    # float64 throughout: F(0) - F(a) is ~1e-4 of F, below float32's resolution.
    model = tiny_model("llama", layers=1).requires_grad_(False).double()
    pairs = token_pairs(4)
    ids, mask, labels = reference_batch(pairs)
    predict = torch.zeros_like(labels, dtype=torch.bool)
    predict[:, :-1] = labels[:, 1:] != -100
    proj = model.get_submodule("model.layers.0.mlp.down_proj")
    state = {}

    def scale(module, args):
        x = args[0].detach() * state["alpha"]
        x.requires_grad_()
        state["x"], state["a"] = x, args[0].detach()
        return (x,)

    handle = proj.register_forward_pre_hook(scale)
    steps, grad_sum = 512, 0.0
    for k in range(steps):
        state["alpha"] = (k + 0.5) / steps
        loss = summed_answer_ce(model, ids, mask, labels)
        grad_sum = grad_sum + torch.autograd.grad(loss, state["x"])[0].double()
    a, mean_g = state["a"].double(), grad_sum / steps
    state["alpha"] = 0.0
    with torch.no_grad():
        f_zero = summed_answer_ce(model, ids, mask, labels)
    handle.remove()
    with torch.no_grad():
        f_dense = summed_answer_ce(model, ids, mask, labels)
    completeness = -(a * mean_g).sum()
    assert completeness.item() == pytest.approx((f_zero - f_dense).item(), rel=1e-5)
    exact = -(a * mean_g)[predict].sum(0)

    errors = []
    for n in (1, 4, 16, 64):
        stats, _, _ = calibrate(model, loader_of(pairs), units=("mlp",), ig_steps=n)
        ig = stats.mlp.sums["integrated_gradients"][0]
        errors.append(((ig - exact).norm() / exact.norm()).item())
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.02, errors


def test_same_seed_and_data_give_identical_statistics():
    runs = [
        calibrate(
            tiny_model("llama", seed=3), loader_of(token_pairs(6)), targets="dense", ig_steps=3
        )[0]
        for _ in range(2)
    ]
    first, second = (r.tensors() for r in runs)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_sanity_check_batches_are_not_counted():
    class Trainable(SparseActivationModule):
        def __init__(self, model):
            super().__init__(model, targets="reference")
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.dummy**2).sum() + 1.0

        def configure_optimizers(self):
            return torch.optim.SGD([self.dummy], lr=0.1)

    pairs = token_pairs(6)
    callback = AttributionCalibration(units=("mlp",))
    trainer = quiet_trainer(
        callbacks=[callback],
        enable_checkpointing=False,
        max_steps=1,
        val_check_interval=1,
        num_sanity_val_steps=2,
    )
    trainer.fit(Trainable(tiny_model("llama")), loader_of(pairs), loader_of(pairs))
    # One real validation epoch over 6 examples of 4 answer tokens; the 2 sanity batches
    # (4 examples) are not in the sums.
    assert callback.statistics.tokens == 6 * 4


# ----------------------------------------------------------------------------- bad input
def test_empty_dataloader_is_an_error():
    with pytest.raises(ValueError, match="dataloader is empty"):
        calibrate(tiny_model("llama"), loader_of([]))


def test_batch_without_answer_tokens_is_an_error():
    pairs = [(p, []) for p, _ in token_pairs(2)]
    with pytest.raises(ValueError, match="no answer tokens"):
        calibrate(tiny_model("llama"), loader_of(pairs))


def test_non_finite_loss_is_an_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        calibrate(model, loader_of(token_pairs(2)))


def test_unsupported_architecture_is_an_error_at_wrap_time():
    from transformers import AutoModelForCausalLM, BloomConfig

    from sparse_lightning import UnsupportedArchitectureError

    bloom = AutoModelForCausalLM.from_config(
        BloomConfig(vocab_size=99, hidden_size=32, n_layer=1, n_head=4)
    )
    with pytest.raises(UnsupportedArchitectureError, match="'bloom' is not supported"):
        SparseActivationModule(bloom)


def test_batch_missing_keys_and_bad_arguments_are_errors():
    module = SparseActivationModule(tiny_model("llama"), targets="reference")
    with pytest.raises(ValueError, match="QACollator"):
        module.prepare_batch({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="targets"):
        SparseActivationModule(tiny_model("llama"), targets="gold")
    with pytest.raises(ValueError, match="subset"):
        AttributionCalibration(units=("neurons",))
    with pytest.raises(ValueError, match="ig_steps"):
        AttributionCalibration(ig_steps=-1)
    with pytest.raises(RuntimeError, match=r"trainer\.validate"):
        _ = AttributionCalibration().statistics
