"""Backbones: dense twins match active parameters, grown models reload with identical outputs."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.errors import ConfigError
from lifelong_moe.models import build_model, count_parameters, load_model, moe_layers, save_model
from lifelong_moe.models.mlp import ResidualMLP
from lifelong_moe.models.vit import PatchTransformer
from lifelong_moe.moe import DenseMLP, MoESettings

SHAPE, CLASSES = [1, 8, 8], 10


@pytest.mark.parametrize("cls", [ResidualMLP, PatchTransformer])
def test_dense_twin_has_equal_active_parameters(cls):
    settings = {"n_experts": 4, "top_k": 2, "blocks": [0, 1] if cls is ResidualMLP else [1, 3]}
    moe = cls(SHAPE, CLASSES, moe=MoESettings(enabled=True, **settings))
    dense = cls(SHAPE, CLASSES, moe=MoESettings(enabled=False, **settings))
    assert len(moe_layers(moe)) == 2 and not moe_layers(dense)
    # Equal up to the top_k gate rows a token is routed by, in each of the 2 MoE layers.
    d_model = moe.head.in_features
    assert count_parameters(moe)["active"] == count_parameters(dense)["total"] + 2 * 2 * d_model
    logits, aux = moe(torch.randn(3, *SHAPE))
    assert logits.shape == (3, CLASSES) and len(aux) == 2


def test_growth_keeps_active_constant_and_adds_exactly_the_new_experts():
    moe = MoESettings(blocks=[0, 1], n_experts=4)
    model = ResidualMLP(SHAPE, CLASSES, d_model=32, d_hidden=16, moe=moe)
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
    model = cls(SHAPE, CLASSES, moe=MoESettings(blocks=[1], n_experts=3))
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


def test_build_model_reads_the_flat_config_keys():
    node = {
        "name": "moe_mlp",
        "_target_": "lifelong_moe.models.mlp.ResidualMLP",
        "d_model": 16,
        "moe": True,
        "moe_blocks": [1],
        "n_experts": 3,
        "top_k": 1,
        "dispatch": "loop",
    }
    model = build_model(node, SHAPE, CLASSES)
    (layer,) = moe_layers(model).values()
    assert (layer.d_model, layer.n_experts, layer.top_k, layer.dispatch) == (16, 3, 1, "loop")
    assert model.ffns[0].fc1.out_features == 256  # block 0 is dense at d_hidden
    dense = build_model({**node, "moe": False}, SHAPE, CLASSES)
    assert not moe_layers(dense) and dense.ffns[1].fc1.out_features == 256  # top_k * d_hidden


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"n_blokcs": 3}, "n_blokcs"),
        ({"moe": "yes"}, "model.moe='yes'"),
        ({"moe_blocks": [2]}, "model.moe_blocks=[2]"),
        ({"moe_blocks": 1}, "model.moe_blocks=1"),
        ({"top_k": 5}, "model.top_k=5"),
        ({"dispatch": "scatter"}, "model.dispatch='scatter'"),
        ({"capacity_factor": 0}, "model.capacity_factor=0"),
        ({"_target_": "lifelong_moe.models.mlp.Nope"}, "model._target_="),
    ],
)
def test_build_model_bad_config_is_one_line(change, fragment):
    node = {"_target_": "lifelong_moe.models.mlp.ResidualMLP", "moe_blocks": [0], **change}
    with pytest.raises(ConfigError) as error:
        build_model(node, SHAPE, CLASSES)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_saved_before_moe_settings_still_loads(tmp_path):
    """Old files: flat config with ``_target_``, layer configs with expand_init/gate_init."""
    cfg = {"name": "moe_mlp", "_target_": "lifelong_moe.models.mlp.ResidualMLP", "moe": True}
    cfg |= {"moe_blocks": [0], "n_experts": 3, "top_k": 2, "capacity_factor": None}
    model = build_model(cfg, SHAPE, CLASSES)
    (layer,) = moe_layers(model).values()
    layer.freeze_existing()
    layer.expand(1)
    path = tmp_path / "model.pt"
    save_model(model, cfg, path, input_shape=SHAPE, n_classes=CLASSES)
    saved = torch.load(path, weights_only=True)
    for layer_cfg in saved["moe"].values():
        layer_cfg |= {"expand_init": "random", "gate_init": "random"}
    torch.save(saved, path)
    reloaded = load_model(path)
    x = torch.randn(4, *SHAPE)
    model.eval(), reloaded.eval()
    assert torch.equal(model(x)[0], reloaded(x)[0])


def test_dense_ffn_takes_the_expert_mask_it_ignores():
    dense = DenseMLP(8, 16)
    x = torch.randn(3, 8)
    y, aux = dense(x, expert_mask=torch.zeros(4, dtype=torch.bool))
    assert aux is None and torch.equal(y, dense(x)[0])
