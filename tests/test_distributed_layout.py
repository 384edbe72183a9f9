"""The process layout of a launched run, in one process: who takes which training examples,
and which process counts are refused before anything is built (run/distributed.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from lifelong_moe.errors import ConfigError
from lifelong_moe.evaluation.shard import shard_batches
from lifelong_moe.run import distributed
from lifelong_moe.run.checkpoints import EpochSampler

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME")


@pytest.mark.parametrize(("n", "replicas"), [(10, 3), (12, 4), (7, 1)])
def test_ranks_split_one_permutation_and_their_first_batches_are_one_batch(n, replicas):
    whole = list(EpochSampler(n, seed=5))
    shards = [list(EpochSampler(n, seed=5, rank=r, replicas=replicas)) for r in range(replicas)]
    assert len({len(s) for s in shards}) == 1  # equal step counts on every rank
    padded = whole + whole[: len(shards[0]) * replicas - n]
    interleaved = [shards[i % replicas][i // replicas] for i in range(len(padded))]
    assert interleaved == padded  # batch b of every rank together = one process's batch
    assert sorted(set(interleaved)) == list(range(n))


def cfg(devices=1, num_nodes=1):
    return OmegaConf.create(
        {"trainer": {"devices": devices, "num_nodes": num_nodes, "accelerator": "cpu"}}
    )


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_needs_no_launcher(no_launcher):
    distributed.check_launch(cfg(), ["seed=1"])
    assert distributed.world_size() == 1


def test_several_devices_without_a_launcher_name_the_torchrun_command(no_launcher):
    with pytest.raises(ConfigError) as error:
        distributed.check_launch(cfg(devices=4), ["trainer.devices=4", "tracking.uri=a b"])
    assert str(error.value).endswith(
        "run: torchrun --nproc-per-node 4 -m lifelong_moe.cli trainer.devices=4 'tracking.uri=a b'"
    )
    with pytest.raises(ConfigError, match="trainer.num_nodes=2 needs a launcher"):
        distributed.check_launch(cfg(num_nodes=2), [])


def test_a_launcher_decides_the_process_count(no_launcher):
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        no_launcher.setenv(name, value)
    distributed.check_launch(cfg(), [])
    distributed.check_launch(cfg(devices=2), [])
    with pytest.raises(ConfigError, match="trainer.devices=4 but the launcher started 2"):
        distributed.check_launch(cfg(devices=4), [])
    layout = distributed.trainer_layout(OmegaConf.merge(cfg(), {"trainer": {"strategy": "auto"}}))
    assert (layout["devices"], layout["num_nodes"]) == (2, 2)
    assert isinstance(layout["strategy"], distributed.LoopDDP)
    assert distributed.global_rank() == 1


def test_loop_ddp_keeps_the_random_state(no_launcher):
    """Lightning's DDP setup re-seeds from the run's seed; the loop's state must survive it."""
    import lightning as L

    L.seed_everything(3, verbose=False)
    torch.rand(5)  # the loop has drawn since the seed
    expected = torch.get_rng_state()
    strategy = distributed.LoopDDP()
    with pytest.MonkeyPatch.context() as patch:  # Lightning's setup, less the process group
        patch.setattr(
            "lightning.pytorch.strategies.ddp.DDPStrategy.setup_distributed",
            lambda self: L.seed_everything(3, verbose=False),
        )
        strategy.setup_distributed()
    assert torch.equal(torch.get_rng_state(), expected)


def test_evaluation_shards_have_equal_batch_counts_and_every_example_once() -> None:
    """Expert parallelism runs a collective in every forward: every rank the same batch count,
    the short ranks padded with empty batches, and each example on exactly one rank."""
    data = TensorDataset(torch.arange(7.0).unsqueeze(1), torch.arange(7))
    for world, batch in ((2, 2), (3, 2), (4, 1), (8, 4)):
        shards = [list(shard_batches(data, batch, r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, (world, batch)
        seen = sorted(int(y) for s in shards for b in s for y in b[1])
        assert seen == list(range(7))
        for s in shards:
            assert all(b[0].shape[1:] == (1,) for b in s)


def test_routing_statistics_of_evaluation_shards_merge_into_one_process_statistics() -> None:
    """Each rank counts its shard; merged, the sums and the top-k sets (in token order, one
    example's block of tokens per rank in turn) are what one process records."""
    from lifelong_moe.evaluation import routing

    examples, block, world = 7, 3, 3
    ids = torch.randint(0, 6, (examples, block, 2), generator=torch.Generator().manual_seed(0))
    whole = routing.new_stats(6)
    routing.add_batch(whole, ids.reshape(-1, 2), None, None)
    shards = []
    for rank in range(world):
        stats = routing.new_stats(6)
        routing.add_batch(stats, ids[rank::world].reshape(-1, 2), None, None)
        shards.append(stats)
    merged = routing.merge_shards(shards, block)
    assert merged["topk"] == whole["topk"]
    assert (merged["tokens"], merged["counts"]) == (whole["tokens"], whole["counts"])
    assert merged["expected"] == pytest.approx(whole["expected"])
