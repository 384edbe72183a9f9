"""SEED (Rypeść et al., "Divide and not forget: Ensemble of selectively trained experts in
continual learning", ICLR 2024): a class-incremental, exemplar-free peer of Lifelong-MoE.

K experts share the early layers of the backbone. Each expert keeps one Gaussian (mean and
full covariance) per class in its own feature space. Following the authors' code
(github.com/grypesc/SEED, ``src/approach/seed.py``):

- Experiences 0..K-1 each train a new expert with cross-entropy through a throw-away linear
  head over the experience's classes. Experience 0 also trains the shared layers, which are
  frozen afterwards; later experts start as a copy of expert 0 (``initialization_strategy=
  first``).
- From experience K on, every expert's Gaussians of the new classes are fitted, the mean
  pairwise KL divergence between them measures how well the expert separates them, and the
  expert with the largest (least overlap) is fine-tuned alone with
  ``(1 - alpha) * CE + alpha * MSE(features, features of the expert before fine-tuning)``.
- After an experience, every expert that exists (k <= min(t, K-1)) fits Gaussians of the
  experience's classes; Gaussians already fitted are kept (no drift compensation).
- Prediction: each expert's log-likelihoods under its Gaussians, a softmax with temperature
  ``tau`` over the classes it knows, averaged over the experts that know each class; argmax.
  No task labels at test time, no exemplars.
- A logged checkpoint (``tracking.log_checkpoints``) holds the whole ensemble, Gaussians
  included; ``models.load_model`` rebuilds it as a ``SeedEnsemble`` that predicts as it did.

Where we deviate, and why:

- Backbones are ours, not ResNets: for ``model=mlp``/``moe_mlp`` the shared part is the input
  embedding plus the first ``shared_blocks`` residual blocks, each expert is the remaining
  blocks plus the final LayerNorm (features: d_model). For ``model=vit``/``moe_vit`` the shared
  part is the patch embedding, positions and the first ``shared_blocks`` transformer blocks;
  each expert is the remaining blocks, the final LayerNorm and the mean pool. The backbone's
  class head is unused.
- The loss is the paper's divided by ``1 - alpha``: ``CE + alpha / (1 - alpha) * MSE``, so that
  the base class's cross-entropy term stays as it is; AdamW is invariant to that constant
  scale (up to its epsilon). The optimizer is our AdamW for ``trainer.max_epochs`` epochs
  (the paper: SGD with step decay, separate fine-tuning epochs).
- Covariances get ``eps * I`` added, eps starting at ``method.shrinkage`` and raised tenfold
  while the matrix is not positive definite, as the authors' code does from eps = 1e-8
  (``method.shrinkage=1e-8`` is that setting; our default 0.1 is a stronger shrinkage that
  never needs raising). ``train/shrinkage_max`` logs the largest eps used.
- Active parameters: every input runs through the stem and every expert that has Gaussians
  (all K from experience K-1 on), so ``cost/params_active`` is that sum
  (``SeedEnsemble.active_parameters``), not one expert's share as for a top-1 MoE. No horizontally flipped copies of the training
  images when fitting Gaussians (a flipped digit is another digit).
- The forward returns ``log`` of the averaged class confidences (clamped at 1e-30), so the
  runner's evaluator reads SEED's Bayes decision as logits through the usual path.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence
from torch.utils.data import DataLoader, Dataset

from lifelong_moe import checks, names
from lifelong_moe.errors import ConfigError
from lifelong_moe.methods.base import ContinualMethod
from lifelong_moe.models.seed_ensemble import SeedEnsemble
from lifelong_moe.stream import Experience, Stream


def fit_gaussian(features: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and shrunk covariance (``cov + eps * I``) of ``features`` [n, d], in float64."""
    mean, cov, _ = gaussian(features, shrinkage)
    return mean, cov


def gaussian(features: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, cov + eps * I, eps): eps starts at ``shrinkage`` and, as in the authors' code
    (which starts at 1e-8), is raised tenfold while the covariance is not positive definite
    (singular with fewer samples than dimensions, or round-off at large scales)."""
    f = features.double()
    mean = f.mean(0)
    centered = f - mean
    cov = centered.T @ centered / max(len(f) - 1, 1)
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    eps = shrinkage
    while torch.linalg.cholesky_ex(cov + eps * eye).info != 0:
        eps *= 10
    return mean, cov + eps * eye, eps


def overlap_score(means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """Mean pairwise KL divergence between one expert's Gaussians of the new classes
    (means [n, d], covs [n, d, d]); larger = the classes overlap less in this expert."""
    new = MultivariateNormal(means.unsqueeze(1), covariance_matrix=covs.unsqueeze(1))
    old = MultivariateNormal(means.unsqueeze(0), covariance_matrix=covs.unsqueeze(0))
    return kl_divergence(new, old).mean()


def select_expert(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, list[float]]:
    """SEED's choice: the expert whose Gaussians of the new classes diverge most (least overlap)."""
    scores = [float(overlap_score(m, c)) for m, c in candidates]
    return max(range(len(scores)), key=lambda k: scores[k]), scores


class Seed(ContinualMethod):
    """SEED as a method: picks, trains and fits the experts; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        n_experts: int = 3,
        shared_blocks: int = 0,
        alpha: float = 0.99,
        tau: float = 3.0,
        shrinkage: float = 0.1,
    ) -> None:
        checks.positive_int("method.n_experts", n_experts)
        checks.fraction("method.alpha", alpha, high_open=True)
        checks.positive("method.tau", tau)
        checks.positive("method.shrinkage", shrinkage)
        n_classes = model.head.out_features
        ensemble = SeedEnsemble(model, n_classes, n_experts, shared_blocks, tau)
        super().__init__(ensemble, lr=lr, weight_decay=weight_decay)
        self.alpha, self.shrinkage = alpha, shrinkage
        self.teacher: nn.Module | None = None
        self.chosen: list[int] = []  # expert trained at each experience
        self.overlaps: list[list[float]] = []  # selection scores, experiences >= K
        self.shrinkage_max = 0.0  # largest eps a fitted Gaussian needed (>= shrinkage)

    def setup_stream(self, stream: Stream) -> None:
        super().setup_stream(stream)
        if stream.scenario != "class_incremental":
            raise ConfigError(
                f"method=seed is class-incremental (new classes per experience), "
                f"benchmark {stream.name} is {stream.scenario}"
            )
        seen: set[int] = set()
        for exp in stream.experiences:
            if not exp.classes or seen & set(exp.classes):
                raise ConfigError(
                    f"method=seed needs disjoint classes per experience; experience {exp.index} "
                    f"of {stream.name} has classes {exp.classes} (task-IL label reuse is not supported)"
                )
            seen |= set(exp.classes)

    @property
    def ensemble(self) -> SeedEnsemble:
        return self.model

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        m = self.ensemble
        K = len(m.experts)
        self.teacher = None
        if exp.index < K:
            k = exp.index
            if k > 0:  # the code's default initialization_strategy="first"
                m.experts[k].load_state_dict(m.experts[0].state_dict())
        else:
            candidates = []
            for j in range(K):
                feats = class_features(m, j, exp.train, exp.classes)
                gauss = [fit_gaussian(feats[c], self.shrinkage) for c in exp.classes]
                candidates.append(
                    (torch.stack([g[0] for g in gauss]), torch.stack([g[1] for g in gauss]))
                )
            k, scores = select_expert(candidates)
            self.overlaps.append(scores)
            self.teacher = copy.deepcopy(m.experts[k]).requires_grad_(False).eval()
        self.chosen.append(k)
        m.requires_grad_(False)
        m.experts[k].requires_grad_(True)
        m.stem.requires_grad_(exp.index == 0)
        device = m.means.device
        m.head = nn.Linear(m.d_features, len(exp.classes)).to(device)
        m.active = k
        m.task_classes = torch.tensor(exp.classes, dtype=torch.long)

    def extra_loss(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, aux: list
    ) -> dict[str, torch.Tensor]:
        if self.teacher is None or self.alpha == 0:
            return {}
        m = self.ensemble
        with torch.no_grad():
            old = self.teacher.to(x.device)(m.last_hidden)
        mse = nn.functional.mse_loss(m.last_features, old)
        return {"feature_kd": self.alpha / (1 - self.alpha) * mse}

    def fit_experience(
        self, exp: Experience, loader: DataLoader, trainer: L.Trainer, ckpt_path: str | None = None
    ) -> None:
        """Train the chosen expert, then fit Gaussians before the runner evaluates."""
        super().fit_experience(exp, loader, trainer, ckpt_path=ckpt_path)
        m = self.ensemble
        m.head, self.teacher, m.last_hidden, m.last_features = None, None, None, None
        for k in range(min(exp.index + 1, len(m.experts))):
            feats = class_features(m, k, exp.train, exp.classes)
            for c in exp.classes:
                m.means[k, c], m.covs[k, c], eps = gaussian(feats[c], self.shrinkage)
                m.present[k, c] = True
                self.shrinkage_max = max(self.shrinkage_max, eps)
        m.requires_grad_(False)

    def evaluation_metrics(self, t: int) -> dict[str, float]:
        """``train/shrinkage_max``: the covariance eps actually used (raised from
        ``method.shrinkage`` where a covariance was singular), so a table can say so."""
        return {names.train_term("shrinkage_max"): self.shrinkage_max}

    def method_state(self) -> dict:
        return {
            **super().method_state(),
            "chosen": self.chosen,
            "overlaps": self.overlaps,
            "shrinkage_max": self.shrinkage_max,
        }

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self.chosen, self.overlaps = list(state.get("chosen", [])), list(state.get("overlaps", []))
        self.shrinkage_max = float(state.get("shrinkage_max", 0.0))


@torch.no_grad()
def class_features(
    m: SeedEnsemble, expert: int, data: Dataset, classes: list[int], batch_size: int = 512
) -> dict[int, torch.Tensor]:
    """Expert ``expert``'s features of ``data``, grouped by class (eval mode)."""
    was_training = m.training
    m.eval()
    device = m.means.device
    feats, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size):
        feats.append(m.features(batch[0].to(device), expert))
        labels.append(batch[1].to(device))
    m.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    return {c: f[y == c] for c in classes}
