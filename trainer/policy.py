"""The neural router: a torch model that scores (task, agent) pairs.

Features are hashed n-grams, so nothing is downloaded and an unseen task type is still a bag
of familiar words: the task side hashes word unigrams and bigrams of the prompt, the task
type and its ``-``/``_``/``.`` parts, and the required capabilities; the agent side hashes
the agent id and its capabilities. One shared ``EmbeddingBag`` (namespaced keys keep the two
sides apart) feeds an MLP over ``[task, agent, task * agent]``; the product term is what
lets "this agent is good at prompts that talk about integrals" carry over to a task type the
Q-table has never seen.

Objective (contextual bandit): **importance-weighted reward regression** (the direct method
with inverse-propensity weights). The router logs which agent it picked and with what
epsilon; we only observe the reward of that one arm. Regressing the observed reward on
(task, agent) gives a score in reward units that the router can use exactly where it uses a
Q-value, and its variance is far lower than a REINFORCE-style policy gradient on the small,
noisy logs a new deployment has. The weights ``1 / clip(propensity)`` (self-normalised per
batch) correct for the router having sampled greedy arms far more often than exploratory
ones, so arms the router rarely tries are not drowned out. A token-level policy-gradient
learner would be a different model over the same :class:`trainer.join.Experience` records.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from stormline.schemas.models import AssignedTask, TaskSubmitted
    from stormline.trainer.join import Experience

_WORD = re.compile(r"[a-z0-9]+")
MIN_PROPENSITY = 0.05  # clip: a logged 1% exploration must not weigh 100x


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild the model; stored in every checkpoint's JSON."""

    buckets: int = 1 << 15
    dim: int = 32
    hidden: int = 64
    max_task_features: int = 256
    max_agent_features: int = 32

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------- features (pure) --
def _bucket(key: str, buckets: int) -> int:
    # Index 0 is the padding slot; crc32 is stable across processes (hash() is salted).
    return 1 + zlib.crc32(key.encode("utf-8")) % (buckets - 1)


def task_keys(text: str, task_type: str, capabilities: Sequence[str]) -> list[str]:
    words = _WORD.findall(text.lower())
    keys = [f"type:{task_type.lower()}"]
    keys += [f"tpart:{p}" for p in re.split(r"[-_.:/ ]+", task_type.lower()) if p]
    keys += [f"cap:{c.lower()}" for c in capabilities]
    keys += [f"w:{w}" for w in words]
    keys += [f"b:{a}_{b}" for a, b in itertools.pairwise(words)]
    return list(dict.fromkeys(keys))  # unique, first occurrence order


def agent_keys(agent_id: str, capabilities: Sequence[str]) -> list[str]:
    return [f"agent:{agent_id}"] + [f"acap:{c.lower()}" for c in capabilities]


def _ids(keys: list[str], width: int, buckets: int) -> list[int]:
    out = [_bucket(k, buckets) for k in keys[:width]]
    return out + [0] * (width - len(out))


def encode_task(
    cfg: PolicyConfig, text: str, task_type: str, capabilities: Sequence[str]
) -> list[int]:
    return _ids(task_keys(text, task_type, capabilities), cfg.max_task_features, cfg.buckets)


def encode_agent(cfg: PolicyConfig, agent_id: str, capabilities: Sequence[str]) -> list[int]:
    return _ids(agent_keys(agent_id, capabilities), cfg.max_agent_features, cfg.buckets)


def importance_weight(propensity: float | None) -> float:
    return 1.0 if propensity is None else 1.0 / max(MIN_PROPENSITY, min(1.0, propensity))


@dataclass
class Dataset:
    """Experiences as padded index arrays: what crosses into the Ray workers."""

    task: np.ndarray  # [N, max_task_features] int64
    agent: np.ndarray  # [N, max_agent_features] int64
    reward: np.ndarray  # [N] float32
    weight: np.ndarray  # [N] float32

    def __len__(self) -> int:
        return int(self.reward.shape[0])


def encode_experiences(cfg: PolicyConfig, exps: Sequence[Experience]) -> Dataset:
    n = len(exps)
    task = np.zeros((n, cfg.max_task_features), dtype=np.int64)
    agent = np.zeros((n, cfg.max_agent_features), dtype=np.int64)
    for i, e in enumerate(exps):
        task[i] = encode_task(cfg, e.task_text, e.task_type, e.required_capabilities)
        agent[i] = encode_agent(cfg, e.agent_id, e.agent_capabilities)
    w = np.array([importance_weight(e.propensity) for e in exps], dtype=np.float32)
    if n:
        w = w / w.mean()  # self-normalised: weights change direction, not step size
    return Dataset(task, agent, np.array([e.reward for e in exps], dtype=np.float32), w)


# ---------------------------------------------------------------------------- model --
class RouterNet(nn.Module):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.EmbeddingBag(cfg.buckets, cfg.dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(
            nn.Linear(3 * cfg.dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1)
        )
        # Small initial embeddings: an n-gram never seen in training (a new task type's own
        # words) then adds almost nothing to the mean, and the words it shares with known
        # types decide the score. With the default N(0, 1) unseen keys drown them in noise.
        with torch.no_grad():
            nn.init.normal_(self.emb.weight, 0.0, 0.1)
            self.emb.weight[0].zero_()

    def forward(self, task: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        t, a = self.emb(task), self.emb(agent)
        # nn.Module.__call__ is typed as returning Any; the MLP returns a tensor.
        out = cast(torch.Tensor, self.mlp(torch.cat([t, a, t * a], dim=-1)))
        return out.squeeze(-1)


def weighted_mse(pred: torch.Tensor, reward: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight * (pred - reward) ** 2).sum() / weight.sum().clamp_min(1e-8)


def evaluate(model: nn.Module, data: Dataset, device: str = "cpu") -> float:
    """Importance-weighted MSE of the reward prediction (lower is better)."""
    if not len(data):
        return float("nan")
    model.eval()
    with torch.no_grad():
        pred = model(
            torch.from_numpy(data.task).to(device), torch.from_numpy(data.agent).to(device)
        )
        loss = weighted_mse(
            pred, torch.from_numpy(data.reward).to(device), torch.from_numpy(data.weight).to(device)
        )
    return float(loss)


def state_to_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}


# --------------------------------------------------------------------------- scorer --
class Scorer:
    """What the router calls: scores of candidate agents for one task, in reward units."""

    def __init__(
        self, model: RouterNet, *, version: int | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.version = version
        self.meta = meta or {}

    def score(
        self,
        task: TaskSubmitted | AssignedTask,
        agent_ids: list[str],
        capabilities: dict[str, list[str]],
    ) -> dict[str, float]:
        if not agent_ids:
            return {}
        t = encode_task(self.cfg, task.prompt, task.task_type, task.required_capabilities)
        task_t = torch.tensor([t] * len(agent_ids), dtype=torch.int64)
        agent_t = torch.tensor(
            [encode_agent(self.cfg, a, capabilities.get(a, [])) for a in agent_ids],
            dtype=torch.int64,
        )
        with torch.no_grad():
            out = self.model(task_t, agent_t).tolist()
        return dict(zip(agent_ids, (float(x) for x in out), strict=True))
