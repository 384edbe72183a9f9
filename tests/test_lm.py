"""Byte-level LM: causal, dense twin with equal active parameters, growth inside, it learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lifelong_moe import names
from lifelong_moe.data.text import VOCAB_SIZE, text_domains
from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation import metrics
from lifelong_moe.evaluation.evaluate_lm import evaluate_lm
from lifelong_moe.methods.lr_schedule import LRSchedule
from lifelong_moe.models import build_model, count_parameters, moe_layers
from lifelong_moe.models.lm import CausalLM
from lifelong_moe.moe import MoESettings
from lifelong_moe.targets import instantiate
from tests.conftest import FAST, benchmark_from_yaml, run_cli, runs, store_uri

CONF = str(Path(__file__).resolve().parent.parent / "conf")
TINY = {"d_model": 32, "d_hidden": 32, "n_heads": 4, "n_blocks": 2}


def tiny(
    moe: bool = True, context_length: int = 16, n_blocks: int = 2, blocks=(1,), **moe_kwargs
) -> CausalLM:
    torch.manual_seed(0)
    settings = MoESettings(enabled=moe, blocks=blocks, **moe_kwargs)
    return CausalLM((context_length,), VOCAB_SIZE, **{**TINY, "n_blocks": n_blocks}, moe=settings)


def small_stream(tmp_path=None, **kwargs):
    defaults = {"domains": ["yaml", "python"], "context_length": 16}
    return text_domains(**{**defaults, "max_bytes_per_domain": 8192, **kwargs})


def test_forward_shapes_and_one_aux_per_moe_layer():
    model = CausalLM(
        (16,), VOCAB_SIZE, n_blocks=4, d_model=32, d_hidden=32, moe=MoESettings(blocks=[1, 3])
    )
    logits, aux = model(torch.randint(0, VOCAB_SIZE, (3, 16)))
    assert logits.shape == (3, 16, VOCAB_SIZE) and len(aux) == 2
    logits, aux = model(torch.randint(0, VOCAB_SIZE, (3, 5)))  # shorter prompts work too
    assert logits.shape == (3, 5, VOCAB_SIZE)
    dense = CausalLM((16,), VOCAB_SIZE, n_blocks=4, moe=MoESettings(False, blocks=[1, 3]))
    assert dense(torch.zeros(2, 16, dtype=torch.long))[1] == []


@pytest.mark.parametrize("train", [True, False])
def test_position_t_never_sees_later_bytes(train):
    model = tiny().train(train)
    x = torch.randint(0, VOCAB_SIZE, (2, 16))
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB_SIZE
    with torch.no_grad():
        a, b = model(x)[0], model(changed)[0]
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_dense_twin_has_equal_active_parameters():
    kwargs = {"n_blocks": 4, "blocks": [1, 3], "n_experts": 4, "top_k": 2}
    moe, dense = tiny(True, **kwargs), tiny(False, **kwargs)
    assert len(moe_layers(moe)) == 2 and not moe_layers(dense)
    # Equal up to the top_k gate rows a token is routed by, in each of the 2 MoE layers.
    gate_rows = 2 * 2 * TINY["d_model"]
    assert count_parameters(moe)["active"] == count_parameters(dense)["total"] + gate_rows
    assert count_parameters(moe)["total"] > count_parameters(dense)["total"]


def test_growth_inside_the_lm_keeps_old_experts_and_the_previous_model():
    model = tiny().eval()
    x = torch.randint(0, VOCAB_SIZE, (4, 16))
    with torch.no_grad():
        before = model(x)[0]
    active = count_parameters(model)["active"]
    (layer,) = moe_layers(model).values()
    layer.freeze_existing()
    layer.expand(2)
    assert (layer.n_experts, layer.n_frozen) == (6, 4)
    assert count_parameters(model)["active"] == active
    old_only = torch.arange(6) < 4
    with torch.no_grad():
        assert torch.equal(model(x, expert_mask=old_only)[0], before)
    frozen = {n: b.clone() for n, b in layer.named_buffers() if "frozen" in n}
    new = {n: p.clone() for n, p in layer.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
    logits, _ = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    assert frozen and all(
        torch.equal(b, frozen[n]) for n, b in layer.named_buffers() if n in frozen
    )
    assert any(not torch.equal(p, new[n]) for n, p in layer.named_parameters())


def test_evaluate_lm_is_an_exact_per_byte_mean_with_routing_shares():
    stream = small_stream()
    model = tiny()
    small_batches = evaluate_lm(model, stream, batch_size=7)
    one_batch = evaluate_lm(model, stream, batch_size=10_000)
    assert small_batches.loss == pytest.approx(one_batch.loss, rel=1e-6)
    x, y, _ = stream.experiences[0].test.tensors
    with torch.no_grad():
        logits = model.eval()(x)[0]
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert one_batch.loss[0] == pytest.approx(manual, rel=1e-5)
    assert one_batch.perplexity == pytest.approx([math.exp(v) for v in one_batch.loss])
    assert abs(one_batch.loss[0] - math.log(VOCAB_SIZE)) < 0.5  # untrained: near uniform
    assert all(0 <= a <= 1 for a in one_batch.accuracy) and one_batch.accuracy_task is None
    (layer_shares,) = one_batch.routing  # one MoE layer
    assert len(layer_shares) == len(stream)
    assert all(sum(shares) == pytest.approx(1.0) and len(shares) == 4 for shares in layer_shares)


def test_a_few_steps_lower_validation_perplexity_and_the_loss_matrix_summarizes():
    stream = small_stream()
    model = tiny()
    before = evaluate_lm(model, stream)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_all, y_all, _ = stream.experiences[0].train.tensors
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        index = torch.randint(0, len(x_all), (32,), generator=generator)
        logits, _ = model(x_all[index])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y_all[index].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_lm(model, stream)
    assert after.perplexity[0] < 0.5 * before.perplexity[0]
    L = [after.loss, after.loss]
    summary = metrics.summarize_loss(L)
    assert summary["ppl/final"] == pytest.approx(sum(after.perplexity) / 2)


def test_lifelong_moe_distills_sequence_logits_after_growth():
    from lifelong_moe.methods.lifelong_moe import LifelongMoE

    stream = small_stream()
    method = LifelongMoE(tiny(), lambda_kd=1.0)
    method.setup_stream(stream)
    method.before_experience(stream.experiences[0])
    method.before_experience(stream.experiences[1])
    (layer,) = moe_layers(method.model).values()
    assert layer.n_experts == 6
    x, y, _ = stream.experiences[1].train[:8]
    logits, aux = method.model(x)
    terms = method.extra_loss(x, y, logits, aux)
    assert set(terms) == {"balance", "kd"} and all(torch.isfinite(v) for v in terms.values())


def test_continual_method_training_step_takes_sequence_logits():
    from lifelong_moe.methods.naive import Naive

    stream = small_stream()
    method = Naive(tiny())
    x, y, t = stream.experiences[0].train[:8]
    loss = method.training_step((x, y, t), 0)
    assert torch.isfinite(loss)


def test_presets_compose_and_build(tmp_path):
    for preset in ("lm_cpu", "lm_gpu"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"experiment={preset}",
                    "benchmark.max_bytes_per_domain=32768",
                    "model.n_blocks=2",
                    "model.moe_blocks=[1]",
                    # lm_gpu's fused kernels would run under Triton's CPU interpreter here
                    # (tests/conftest.py), minutes for one window: they have their own tests.
                    "model.dispatch=grouped",
                ],
            )
        assert cfg.model.name == "moe_lm" and cfg.benchmark.name == "text_domains"
        stream = instantiate(cfg.benchmark, "benchmark")
        model = build_model(cfg.model, list(stream.input_shape), stream.n_classes)
        x = stream.experiences[0].test.tensors[0][:2]
        assert model(x)[0].shape == (len(x), stream.input_shape[0], VOCAB_SIZE)  # lm_gpu: 1 window


def test_lm_rejects_image_inputs_in_one_line():
    with pytest.raises(ConfigError, match="benchmark=text_domains") as error:
        CausalLM((1, 8, 8), 10)
    assert "\n" not in str(error.value)


def test_cli_lm_with_the_therien_recipe_rewarms_redecays_and_replays(tmp_path: Path):
    """moe_finetune on two tiny text domains with both options of the continual pre-training
    recipe; the learning rates the optimizer stepped with and the replayed windows come back
    from MLflow as the schedule and the fraction say."""
    from mlflow.tracking import MlflowClient

    uri = store_uri(tmp_path)
    tiny_text = ["benchmark.domains=[yaml,python]", "benchmark.max_bytes_per_domain=6144"]
    run_cli(
        tmp_path,
        "experiment=lm_cpu",
        *tiny_text,
        *[f"model.{k}={v}" for k, v in TINY.items()],
        "model.moe_blocks=[1]",
        "model.dispatch=grouped",
        "method=moe_finetune",
        "trainer.lr_schedule=cosine_rewarm",
        "trainer.warmup_steps=2",
        "method.replay_fraction=0.25",
        "trainer.batch_size=16",
        *FAST,
        f"tracking.uri={uri}",
    )
    (run,) = runs(uri, experiment="lm")
    assert run.info.status == "FINISHED"
    client = MlflowClient(uri)

    def history(key: str) -> list[float]:
        return [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]

    stream = benchmark_from_yaml(
        "text_domains", domains=["yaml", "python"], max_bytes_per_domain=6144, context_length=64
    )
    new = [len(e.train) for e in stream.experiences]
    replayed = [0, round(0.25 * new[1] / 0.75)]  # 0.25 of experience 1's training set
    assert history(names.TRAIN_REPLAYED) == replayed
    lr = float(run.data.params["method.lr"])
    schedule = LRSchedule("cosine_rewarm", warmup_steps=2, lr_floor=0.1)
    for i, (mean, last) in enumerate(
        zip(history(names.TRAIN_LR_MEAN), history(names.TRAIN_LR_LAST), strict=True)
    ):
        total = -(-(new[i] + replayed[i]) // 16) * 2  # steps: batches of 16, 2 epochs
        factors = [schedule.factor(k, total, i) for k in range(total)]
        assert mean == pytest.approx(lr * sum(factors) / total, rel=1e-12)
        assert last == pytest.approx(lr * 0.1, rel=1e-12)  # re-decayed to the floor
    assert history(names.PPL_FINAL)[-1] > 1
