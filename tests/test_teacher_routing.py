"""The distillation target is the model that was evaluated after the previous experience,
routed the same way (issue 24: the teacher of inferred routing used to run without its bias)."""

from __future__ import annotations

import pytest
import torch

from lifelong_moe.methods.inferred_routing import routing_bias
from tests.test_lifelong_moe import fit, make


def evaluated(method, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and per-layer top-k ids of the model as the runner evaluates it (eval mode)."""
    was_training = method.model.training
    method.model.eval()
    with torch.no_grad():
        logits, aux = method.model(x)
    method.model.train(was_training)
    return logits, [a.expert_ids.sort(dim=1).values for a in aux]


@pytest.mark.parametrize(
    ("freeze_shared", "source"),
    [(False, "statistics"), (True, "statistics"), (False, "shuffled")],
    ids=["snapshot", "masked_student", "shuffled_labels"],
)
def test_teacher_is_routed_exactly_as_the_evaluated_model(freeze_shared, source):
    method, stream = make(
        experts_per_experience=2,
        infer_routing=True,
        infer_bonus=2.0,
        freeze_shared=freeze_shared,
        lambda_router=1.0,
        infer_source=source,
    )
    # After two experiences (each with its own experts), as fit_experience leaves it.
    for exp in stream.experiences[:2]:
        method.before_experience(exp)
        fit(method, exp)
        method.statistics.add(exp.train)
    x = torch.cat([e.test.tensors[0] for e in stream.experiences])
    logits, ids = evaluated(method, x)

    method.before_experience(stream.experiences[2])
    method.model.train()  # the teacher runs inside training_step
    teacher_logits, aux = method.teacher_outputs(x)
    torch.testing.assert_close(teacher_logits, logits, rtol=0, atol=0)
    for before, a in zip(ids, aux, strict=True):
        assert torch.equal(a.expert_ids.sort(dim=1).values, before)
    # Without the bias (what the teacher did before the fix) the routing differs: the test
    # above could fail.
    if method.teacher is not None:
        plain = method.teacher(x)
    else:
        plain = method.model(x, expert_mask=method.teacher_mask)
    assert any(
        not torch.equal(a.expert_ids.sort(dim=1).values, b)
        for a, b in zip(plain[1], ids, strict=True)
    )


def test_inference_accuracy_is_logged_per_seen_experience_and_their_mean():
    method, stream = make(experts_per_experience=2, infer_routing=True)
    assert method.evaluation_metrics(0) == {}  # nothing learned yet
    for exp in stream.experiences[:2]:
        method.before_experience(exp)
        method.statistics.add(exp.train)
    out = method.evaluation_metrics(1)
    accs = [
        (method.statistics.infer(stream.experiences[j].test.tensors[0]) == j).float().mean().item()
        for j in (0, 1)
    ]
    expected = {"routing/inference_acc/exp_0": accs[0], "routing/inference_acc/exp_1": accs[1]}
    assert out == pytest.approx(expected | {"routing/inference_acc": sum(accs) / 2})
    shuffled, _ = make(experts_per_experience=2, infer_routing=True, infer_source="shuffled")
    for exp in stream.experiences[:2]:
        shuffled.before_experience(exp)
        shuffled.statistics.add(exp.train)
    # routed with a wrong experience wherever the statistics were right: 1 - accuracy
    wrong = shuffled.evaluation_metrics(1)["routing/inference_acc"]
    assert wrong == pytest.approx(1 - sum(accs) / 2)
    # by hand on the first experience: inferred == 0 on its test inputs
    x0 = stream.experiences[0].test.tensors[0]
    assert accs[0] == pytest.approx((method.statistics.infer(x0) == 0).float().mean().item())
    assert make(experts_per_experience=2)[0].evaluation_metrics(1) == {}


def test_oracle_routes_each_test_experience_by_its_true_label_and_shuffled_by_a_wrong_one():
    method, stream = make(experts_per_experience=2, infer_routing=True, infer_source="oracle")
    for exp in stream.experiences[:2]:
        method.before_experience(exp)
        method.statistics.add(exp.train)
    method.model.eval()
    origin = torch.tensor(method.expert_origin)  # [0, 0, 0, 0, 1, 1]
    for exp, label in zip(stream.experiences, (0, 1, 1), strict=True):  # future: latest learned
        bias = method.expert_mask(exp)
        expected = routing_bias(torch.tensor(label), origin, 0.0, True)
        assert torch.equal(bias, expected)
    method.model.train()
    assert method.expert_mask(stream.experiences[0]) is None  # training knows its experience
    shuffled, _ = make(experts_per_experience=2, infer_routing=True, infer_source="shuffled")
    for exp in stream.experiences[:2]:
        shuffled.before_experience(exp)
        shuffled.statistics.add(exp.train)
    x = stream.experiences[0].test.tensors[0]
    inferred = shuffled.statistics.infer(x)
    assert torch.equal(shuffled.inferred_experience(x, oracle=1), (inferred + 1) % 2)
