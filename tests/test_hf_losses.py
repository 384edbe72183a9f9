"""The families' own router losses and noise: transformers' load-balancing loss (pooled over
layers, top-k counts) and Mixtral's router jitter, against transformers' own values."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lifelong_moe.errors import ConfigError  # noqa: E402
from lifelong_moe.methods.lifelong_moe import LifelongMoE  # noqa: E402
from lifelong_moe.models import moe_layers  # noqa: E402
from lifelong_moe.models.hf_moe import HFMoECausalLM  # noqa: E402
from lifelong_moe.moe import MoESettings  # noqa: E402
from tests.test_hf_moe import FAMILIES, LENGTH, VOCAB, _tokens  # noqa: E402

family = pytest.mark.parametrize("fam", list(FAMILIES))
TRANSFORMERS_LOSS = MoESettings(balance_loss="transformers")


def _pair(fam: str, directory, **extra) -> tuple[torch.nn.Module, HFMoECausalLM]:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(fam, **FAMILIES[fam], **extra)
    ref = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    ref.save_pretrained(directory)
    ours = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(directory), moe=TRANSFORMERS_LOSS)
    return ref, ours


@family
def test_balance_loss_and_its_gradient_equal_transformers(fam, tmp_path):
    ref, ours = _pair(fam, tmp_path)
    x = _tokens()
    want = ref(input_ids=x, output_router_logits=True).aux_loss
    want.backward()
    _, aux = ours(x)
    got = sum(a.balance_loss for a in aux)
    got.backward()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    # Its gradient reaches the gate rows as transformers' does.
    for spec, layer in zip(ours.block_specs, moe_layers(ours).values(), strict=True):
        gate = ref.get_submodule(f"{spec.path}.{spec.router}").weight.grad
        torch.testing.assert_close(layer.router.weight.grad, gate, rtol=1e-4, atol=1e-7)
    # The toolkit's Switch loss is another number: per layer, shares rather than top-k counts.
    switch = HFMoECausalLM([LENGTH], VOCAB, pretrained=str(tmp_path))
    assert abs(float(sum(a.balance_loss for a in switch(x)[1])) - float(want)) > 1e-3


def test_null_method_settings_take_the_models_own(tmp_path):
    """lambda_aux: the checkpoint's router_aux_loss_coef; inits: results/hf_init.md's choice."""
    _, ours = _pair("mixtral", tmp_path, router_aux_loss_coef=0.02)
    method = LifelongMoE(ours)
    assert (method.lambda_aux, method.expand_init, method.gate_init) == (
        0.02,
        "copy_most_used",
        "random",
    )
    method = LifelongMoE(ours, lambda_aux=0.5, expand_init="upcycle", gate_init="zero")
    assert (method.lambda_aux, method.expand_init, method.gate_init) == (0.5, "upcycle", "zero")
    toolkit = LifelongMoE(torch.nn.Sequential(MoESettings(blocks=[0]).ffn(8, 8, 0)))
    assert (toolkit.lambda_aux, toolkit.expand_init, toolkit.gate_init) == (0.01, "random", "mean")


def test_mixtral_router_jitter_in_training_only(tmp_path):
    ref, ours = _pair("mixtral", tmp_path, router_jitter_noise=0.2)
    x = _tokens()
    ref.train(), ours.train()
    torch.manual_seed(5)
    want = ref(input_ids=x).logits
    torch.manual_seed(5)
    got, _ = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(ours(x)[0], got)  # noise drawn, not a constant
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_transformers_loss_is_for_hf_models_only():
    settings = MoESettings(blocks=[0], balance_loss="transformers")
    with pytest.raises(ConfigError, match="model.balance_loss='transformers': pooled over layers"):
        list(settings.ffns(16, 16, 1))
