"""Distribution-inferred routing: which experience does an input come from, without task labels?

Lifelong-MoE's new gate rows train only on the new experience, so nothing stops them from also
scoring high on earlier data (measured: routing at chance, the newest experts taking most of
every domain's tokens). Here the method keeps, per experience, statistics of a pooled input
feature (no stored examples, as SEED keeps per-class Gaussians), infers at test time the
experience each input most likely comes from, and turns that into a per-token routing bias:
experts grown after the inferred experience are hidden (the input sees the model as it stood
after that experience: old experts stay reachable) and the experts grown for it get a logit bonus.

The feature is the *input*, not a hidden state: with trainable shared weights a hidden state
drifts after its statistics were taken, the input does not.

- Token sequences (long [B, L], language modelling): a byte bigram model per experience (the
  categorical analogue of a Gaussian), interpolated with a Laplace-smoothed unigram model.
  Position t is assigned from the bytes up to t only (causal: the log-likelihood is a cumulative
  sum), so no position's routing sees the bytes it must predict. On the four built-in domains
  (64-byte windows) the bigram model names the right domain for 82-91 % of test positions, the
  unigram model alone for 71-84 %.
- Anything else (float [B, ...]): one Gaussian per experience on the flattened input, with the
  covariance shrunk toward a scaled identity so that it stays invertible with few samples.

``ExperienceInference`` is the one piece every method given this side information uses: the
statistics, the ablation switch ``infer_source`` and the ``routing/inference_acc`` metric.
``lifelong_moe_specialized`` turns its answer into a routing bias (``routing_bias``),
``dense_heads`` into the choice of an output head.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from lifelong_moe import checks, names
from lifelong_moe.stream import Stream

SHRINKAGE = 0.1  # weight of the scaled identity in each covariance
BIGRAM_WEIGHT = 0.8  # p(b | a) = 0.8 * bigram + 0.2 * unigram
MAX_BIGRAM_VOCAB = 4096  # larger vocabularies keep the unigram model only (V^2 counts)

# Where an input's experience is taken from at test time (ablations, issue 24): the input
# statistics; the true experience (an oracle: the latest learned one for a future experience);
# or the statistics' answer rotated by one (j -> j+1 mod n), wrong for every input.
INFER_SOURCES = ("statistics", "oracle", "shuffled")


class ExperienceStatistics:
    """Sufficient statistics per experience, and the inference of an input's experience."""

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.stats: list[dict[str, torch.Tensor]] = []  # one per experience, in order
        self._cache: list[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.stats)

    @torch.no_grad()
    def add(self, data: Dataset, batch_size: int = 1024) -> None:
        """Statistics of one experience's training inputs (appended: experience len(self))."""
        acc: dict[str, torch.Tensor] = {}
        for batch in DataLoader(data, batch_size=batch_size):
            x = batch[0]
            if not x.is_floating_point():
                if self.vocab_size is None:
                    self.vocab_size = int(x.max()) + 1
                x = x.long()
                counts = torch.bincount(x.reshape(-1), minlength=self.vocab_size)
                acc["counts"] = acc.get("counts", 0) + counts.double()
                if self.vocab_size <= MAX_BIGRAM_VOCAB and x.dim() == 2 and x.shape[1] > 1:
                    pairs = (x[:, :-1] * self.vocab_size + x[:, 1:]).reshape(-1)
                    pairs = torch.bincount(pairs, minlength=self.vocab_size**2).double()
                    acc["pairs"] = acc.get("pairs", 0) + pairs.view(self.vocab_size, -1)
            else:
                flat = x.reshape(x.shape[0], -1).double()
                acc["n"] = acc.get("n", 0) + torch.tensor(float(flat.shape[0]))
                acc["sum"] = acc.get("sum", 0) + flat.sum(0)
                acc["outer"] = acc.get("outer", 0) + flat.t() @ flat
        self.stats.append(acc)
        self._cache = None

    def _models(self) -> list[dict[str, torch.Tensor]]:
        """Per experience: log-probabilities of each byte, or mean, precision and log-det."""
        if self._cache is None:
            models = []
            for acc in self.stats:
                if "counts" in acc:
                    p = (acc["counts"] + 1.0) / (acc["counts"].sum() + acc["counts"].numel())
                    model = {"log_p": p.log().float()}
                    if "pairs" in acc:
                        rows = acc["pairs"].sum(dim=1, keepdim=True)
                        bigram = torch.where(rows > 0, acc["pairs"] / rows.clamp_min(1), 0.0)
                        mixed = BIGRAM_WEIGHT * bigram + (1 - BIGRAM_WEIGHT) * p[None, :]
                        model["log_p2"] = mixed.log().float()  # [previous byte, byte]
                    models.append(model)
                    continue
                n = acc["n"]
                mean = acc["sum"] / n
                cov = acc["outer"] / n - torch.outer(mean, mean)
                d = cov.shape[0]
                scale = cov.diagonal().mean().clamp_min(1e-6)
                cov = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * torch.eye(d, dtype=cov.dtype)
                chol = torch.linalg.cholesky(cov)
                models.append(
                    {
                        "mean": mean.float(),
                        "chol": chol.float(),
                        "logdet": (2 * chol.diagonal().log().sum()).float(),
                    }
                )
            self._cache = models
        return self._cache

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """[J, B, L] for token sequences (causal, per position), [J, B] otherwise."""
        models = self._models()
        if not x.is_floating_point():
            x = x.long()
            log_p = torch.stack([m["log_p"] for m in models]).to(x.device)  # [J, V]
            per_byte = log_p[:, x]  # [J, B, L]
            if "log_p2" in models[0] and x.shape[-1] > 1:
                log_p2 = torch.stack([m["log_p2"] for m in models]).to(x.device)  # [J, V, V]
                per_byte[..., 1:] = log_p2[:, x[..., :-1], x[..., 1:]]
            return per_byte.cumsum(dim=-1)
        flat = x.reshape(x.shape[0], -1).float()
        out = []
        for m in models:
            diff = (flat - m["mean"].to(x.device)).t()  # [D, B]
            z = torch.linalg.solve_triangular(m["chol"].to(x.device), diff, upper=False)
            d = flat.shape[1]
            out.append(-0.5 * (z.square().sum(0) + m["logdet"] + d * math.log(2 * math.pi)))
        return torch.stack(out)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely experience (uniform prior): long [B, L] for tokens, [B] otherwise."""
        return self.log_likelihood(x).argmax(dim=0)

    def state_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.vocab_size = state["vocab_size"]
        self.stats = state["stats"]
        self._cache = None


class ExperienceInference:
    """The experience each test input is taken to come from, under ``infer_source``.

    The statistics of an experience are added after its training (``add``), so after
    experience t the answers range over 0..t.
    """

    def __init__(self, source: str = "statistics", vocab_size: int | None = None) -> None:
        self.source = checks.choice("method.infer_source", source, INFER_SOURCES)
        self.statistics = ExperienceStatistics(vocab_size)

    def __len__(self) -> int:
        return len(self.statistics)

    def add(self, data: Dataset) -> None:
        """Statistics of the experience just trained (the whole of its training data)."""
        self.statistics.add(data)

    def oracle(self, index: int) -> int:
        """The true experience ``index``, clamped to the experiences learned so far."""
        return min(index, len(self) - 1)

    def infer(self, x: torch.Tensor, oracle: int) -> torch.Tensor:
        """Long [B, L] for tokens (per position, causal), [B] otherwise; ``oracle`` is the
        true experience (see ``oracle``), used only by ``infer_source=oracle``."""
        inferred = self.statistics.infer(x)
        if self.source == "oracle":
            return torch.full_like(inferred, oracle)
        if self.source == "shuffled":
            return (inferred + 1) % len(self)
        return inferred

    def accuracy(self, stream: Stream, t: int, batch_size: int = 1024) -> dict[str, float]:
        """``routing/inference_acc`` = mean over seen test experiences j <= t of the share of
        j's test inputs (positions, for text) taken as experience j: the statistics' answer, or
        the oracle's (1) or the shuffled one (0) under ``infer_source``;
        ``routing/inference_acc/exp_j`` per experience. Empty before any statistics."""
        out = {}
        for j in range(min(t + 1, len(self))):
            right, total = 0, 0
            for batch in DataLoader(stream.experiences[j].test, batch_size=batch_size):
                used = self.infer(batch[0], oracle=j)
                right, total = right + int((used == j).sum()), total + used.numel()
            out[names.exp_metric(names.ROUTING_INFERENCE_ACC, j)] = right / max(total, 1)
        if out:
            out[names.ROUTING_INFERENCE_ACC] = sum(out.values()) / len(out)
        return out


def routing_bias(
    experience: torch.Tensor, origin: torch.Tensor, bonus: float, restrict: bool
) -> torch.Tensor:
    """Float logit bias [..., E] for inputs assigned to ``experience`` [...]: -inf on experts
    created after it (when ``restrict``), +``bonus`` on the experts created for it, else 0."""
    e = experience.unsqueeze(-1)
    origin = origin.to(experience.device)
    bias = torch.where(origin == e, bonus, 0.0)
    if restrict:
        bias = bias.masked_fill(origin > e, float("-inf"))
    return bias
