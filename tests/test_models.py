"""Backbones: dense twins match active parameters, grown models reload with identical outputs."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.models import count_parameters, load_model, moe_layers, save_model
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.models.vit import PatchTransformer

SHAPE, CLASSES = [1, 8, 8], 10


@pytest.mark.parametrize("cls", [ResidualMLP, PatchTransformer])
def test_dense_twin_has_equal_active_parameters(cls):
    kwargs = {"input_shape": SHAPE, "n_classes": CLASSES, "n_experts": 4, "top_k": 2}
    blocks = {"moe_blocks": [0, 1]} if cls is ResidualMLP else {"moe_blocks": [1, 3]}
    moe = cls(**kwargs, **blocks, moe=True)
    dense = cls(**kwargs, **blocks, moe=False)
    assert len(moe_layers(moe)) == 2 and not moe_layers(dense)
    # Equal up to the top_k gate rows a token is routed by, in each of the 2 MoE layers.
    d_model = moe.head.in_features
    assert count_parameters(moe)["active"] == count_parameters(dense)["total"] + 2 * 2 * d_model
    logits, aux = moe(torch.randn(3, *SHAPE))
    assert logits.shape == (3, CLASSES) and len(aux) == 2


def test_growth_keeps_active_constant_and_adds_exactly_the_new_experts():
    model = ResidualMLP(SHAPE, CLASSES, d_model=32, d_hidden=16, moe_blocks=[0, 1], n_experts=4)
    before = count_parameters(model)
    for layer in moe_layers(model).values():
        layer.freeze_existing()
        layer.expand(2)
    after = count_parameters(model)
    per_expert = 2 * 32 * 16 + 32  # w1, w2 and one gate row
    assert after["total"] - before["total"] == 2 * 2 * per_expert
    assert after["active"] == before["active"]
    assert after["trainable"] == before["trainable"] - 2 * 4 * per_expert + 2 * 2 * per_expert


@pytest.mark.parametrize("cls", [ResidualMLP, PatchTransformer])
def test_grown_checkpoint_reloads_with_identical_outputs(tmp_path, cls):
    cfg = {"_target_": f"{cls.__module__}.{cls.__name__}", "moe_blocks": [1], "n_experts": 3}
    model = cls(SHAPE, CLASSES, moe_blocks=[1], n_experts=3)
    for _ in range(2):
        for layer in moe_layers(model).values():
            layer.freeze_existing()
            layer.expand(2)
    path = tmp_path / "model.pt"
    save_model(model, cfg, path, input_shape=SHAPE, n_classes=CLASSES)
    reloaded = load_model(path)
    (layer,) = moe_layers(reloaded).values()
    assert (layer.n_experts, layer.n_frozen) == (7, 5)
    x = torch.randn(5, *SHAPE)
    model.eval(), reloaded.eval()
    assert torch.equal(model(x)[0], reloaded(x)[0])
