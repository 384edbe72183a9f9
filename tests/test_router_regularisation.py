"""Router-level options of Lifelong-MoE: routing distillation, balance scope, inferred routing."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from lifelong_moe import names
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.distillation import router_distillation
from lifelong_moe.methods.inferred_routing import ExperienceStatistics, routing_bias
from lifelong_moe.moe import MoESettings
from lifelong_moe.moe.layer import MoEAux
from tests.conftest import FAST, run_cli, runs, store_uri
from tests.test_lifelong_moe import fit, make


def aux_with(logits: torch.Tensor) -> MoEAux:
    zero = torch.zeros(())
    return MoEAux(zero, zero, torch.zeros(logits.shape[1]), zero, logits)


def test_router_distillation_is_zero_for_identical_routing_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(32, 4, generator=g)
    student = torch.cat([old, torch.randn(32, 2, generator=g) * 5], dim=1)  # + 2 new experts
    # The new experts' logits do not enter: only the distribution over the 4 old ones.
    same = router_distillation([aux_with(student)] * 2, [aux_with(old)] * 2, n_old=4)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    shifted = student.clone()
    shifted[:, 0] += 2.0
    differ = router_distillation([aux_with(shifted)], [aux_with(old)], n_old=4)
    assert differ.item() > 0.01


def test_router_distillation_in_training_zero_where_the_old_routing_is_unchanged():
    # freeze_shared: the teacher is the student with the new experts masked. The first MoE
    # layer sees the same input in both, so its old experts' routing is identical (term 0);
    # the second sees the first layer's output, which the new experts change (term > 0).
    method, stream = make(
        experts_per_experience=2, lambda_kd=0.0, lambda_router=1.0, freeze_shared=True
    )
    method.before_experience(stream.experiences[0])
    method.before_experience(stream.experiences[1])
    x, y = stream.experiences[1].train.tensors[:2]
    logits, aux = method.model(x)
    _, teacher_aux = method.teacher_outputs(x)
    assert router_distillation(aux[:1], teacher_aux[:1], 4).item() == pytest.approx(0, abs=1e-6)
    assert router_distillation(aux[1:], teacher_aux[1:], 4).item() > 1e-4
    terms = method.extra_loss(x, y, logits, aux)
    assert terms["router_kd"].item() > 0
    assert "kd" not in terms  # lambda_kd=0: the teacher runs for the routing term alone


def test_balance_scope_reaches_every_router_through_growth_and_bad_values_stop():
    # An MoE setting of the model (model.balance_scope; method.balance_scope until issue 21).
    moe = MoESettings(blocks=[0, 1], n_experts=4, balance_scope="trainable")
    method, stream = make(moe=moe)
    method.before_experience(stream.experiences[0])
    method.before_experience(stream.experiences[1])  # grown: 4 frozen + 2 new experts per layer
    routers = [layer.router for layer in method.layers.values()]
    assert [(r.balance_scope, r.n_frozen) for r in routers] == [("trainable", 4)] * 2
    with pytest.raises(ConfigError, match=r"^model.balance_scope='new': expected one of"):
        MoESettings(balance_scope="new")
    with pytest.raises(ConfigError, match="lambda_router=-1"):
        make(lambda_router=-1)


def test_statistics_infer_the_experience_of_gaussian_and_token_inputs():
    stats = ExperienceStatistics()
    g = torch.Generator().manual_seed(0)
    for shift in range(3):
        stats.add(torch.utils.data.TensorDataset(torch.randn(200, 6, generator=g) + 2 * shift))
    test = torch.cat([torch.randn(50, 6, generator=g) + 2 * s for s in range(3)])
    truth = torch.arange(3).repeat_interleave(50)
    assert (stats.infer(test) == truth).float().mean() > 0.9
    tokens = ExperienceStatistics(vocab_size=4)
    tokens.add(torch.utils.data.TensorDataset(torch.zeros(10, 8, dtype=torch.long)))
    tokens.add(torch.utils.data.TensorDataset(torch.full((10, 8), 3, dtype=torch.long)))
    # causal: position t decides from bytes <= t only; a 3 after two 0s is not yet enough
    seq = torch.tensor([[0, 0, 3, 3, 3, 3]])
    assert stats_infer(tokens, seq) == [0, 0, 0, 0, 1, 1]


def stats_infer(stats: ExperienceStatistics, seq: torch.Tensor) -> list[int]:
    return stats.infer(seq)[0].tolist()


def test_routing_bias_hides_later_experts_and_favours_the_inferred_ones():
    origin = torch.tensor([0, 0, 1, 1, 2, 2])
    bias = routing_bias(torch.tensor([0, 1, 2]), origin, bonus=3.0, restrict=True)
    inf = float("-inf")
    assert bias.tolist() == [
        [3.0, 3.0, inf, inf, inf, inf],
        [0.0, 0.0, 3.0, 3.0, inf, inf],
        [0.0, 0.0, 0.0, 0.0, 3.0, 3.0],
    ]
    open_bias = routing_bias(torch.tensor([0]), origin, bonus=1.0, restrict=False)
    assert open_bias.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]


def test_inferred_routing_sends_earlier_experiences_to_their_own_view_at_test_time():
    method, stream = make(experts_per_experience=2, infer_routing=True, infer_bonus=2.0)
    for exp in stream.experiences[:2]:
        method.before_experience(exp)
        fit(method, exp)  # fit, not fit_experience: statistics are added below
        method.statistics.add(exp.train)
    assert method.expert_origin == [0, 0, 0, 0, 1, 1]
    method.model.eval()
    x0 = stream.experiences[0].test.tensors[0]
    inferred = method.statistics.infer(x0)
    assert (inferred == 0).float().mean() > 0.9
    _, aux = method.model(x0)
    for a in aux:  # inputs inferred as experience 0 never reach the experts grown for 1
        assert a.tokens_per_expert[4:].sum() <= 2 * (inferred == 1).sum()
    _, aux = method.model(stream.experiences[1].test.tensors[0])
    assert all(a.tokens_per_expert[4:].sum() > 0 for a in aux)
    # An explicit mask (e.g. the masked teacher's) wins over the inferred bias.
    _, aux = method.model(x0, expert_mask=torch.tensor([False] * 4 + [True] * 2))
    assert all(a.tokens_per_expert[:4].sum() == 0 for a in aux)
    with pytest.raises(ConfigError, match="choose one"):
        make(infer_routing=True, task_aware_routing=True, experts_per_experience=2)


@pytest.mark.parametrize(
    "option",
    ["method.lambda_router=1.0", "method.balance_scope=trainable", "method.infer_routing=true"],
)
def test_cli_option_runs_and_logs_routing_metrics(workdir, option):
    uri = store_uri(workdir)
    run_cli(
        workdir,
        "method=lifelong_moe",
        "benchmark=permuted_digits",
        "benchmark.n_experiences=3",
        option,
        "method.infer_bonus=2.0",
        f"tracking.uri={uri}",
        *FAST,
        "trainer.max_epochs=1",
    )
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    key, value = option.split("=")
    # method.balance_scope (its name until issue 21) is recorded as model.balance_scope
    assert run.data.params[names.modern_key(key)].lower() == value.lower()
    client = MlflowClient(uri)
    spec = client.get_metric_history(run.info.run_id, "routing/specialization")
    assert [m.step for m in spec] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "routing/drift")] == [1, 2]
    for name in ("specialization", "drift", "specialization_corrected", "mri_max", "token_drift"):
        for layer in (0, 1):
            assert f"routing/{name}/layer_{layer}" in run.data.metrics
    assert 0.0 <= run.data.metrics["routing/specialization"] <= 1.0
    if option == "method.infer_routing=true":
        # permuted digits are told apart by their pixel statistics: near-perfect specialization
        assert run.data.metrics["routing/specialization"] > 0.9
        assert 0.9 < run.data.metrics["routing/inference_acc"] <= 1.0
