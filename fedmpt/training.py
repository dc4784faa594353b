"""Framework-agnostic local training, evaluation and FedAvg over frozen-feature datasets.

These are the functions the Flower apps call (and the in-process federated loop of :mod:`fedmpt.federated`):

* :func:`client_update` trains a method's trainable state for ``local_epochs`` on one client's features and
  returns the new state with its example count;
* :func:`evaluate` scores a state on a feature set and returns multi-label metrics;
* :func:`fedavg` averages states weighted by example counts.

Every method shares this one loop. The loss is the asymmetric loss reduced per sample (summed over each
sample's known labels) and averaged over the batch, so one sample's loss depends on that sample only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmpt.backbone.loader import Backbone
from fedmpt.errors import ConfigError
from fedmpt.feature_cache import FeatureCache, FeatureKey, encode_dataset
from fedmpt.methods.base import Method
from fedmpt.metrics import MultiLabelMetrics, multilabel_metrics
from fedmpt.model.asymmetric_loss import asymmetric_loss

logger = logging.getLogger(__name__)

State = dict[str, Tensor]


@dataclass(frozen=True)
class FeatureData:
    """Frozen image features of a dataset with its labels.

    Attributes:
        global_features: (n, D) float.
        patch_features: (n, M, D) float.
        labels: (n, C) int8 in {1, 0, -1 (unknown)}.
    """

    global_features: Tensor
    patch_features: Tensor
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = self.global_features.shape[0]
        if self.patch_features.shape[0] != n or self.labels.shape[0] != n:
            raise ConfigError(
                f"feature/label rows disagree: global {tuple(self.global_features.shape)}, "
                f"patches {tuple(self.patch_features.shape)}, labels {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.global_features.shape[0])

    def subset(self, indices: np.ndarray | Sequence[int]) -> FeatureData:
        """Rows ``indices`` as a new :class:`FeatureData`."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return FeatureData(self.global_features[idx], self.patch_features[idx], self.labels[np.asarray(indices)])


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings.

    Defaults: SGD with the paper's lr 0.001 and one local epoch per round, momentum 0.9 and weight decay 1e-5
    as in the authors' code, batch 32; asymmetric loss with the authors' gamma+ = 1, gamma- = 2, clip 0.05.
    The optimizer state is fresh every round (standard FedAvg; the authors' code keeps momentum buffers on the
    client across rounds).
    """

    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-5
    local_epochs: int = 1
    batch_size: int = 32
    gamma_pos: float = 1.0
    gamma_neg: float = 2.0
    clip: float = 0.05
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"TrainConfig.local_epochs and batch_size must be >= 1, got {self.local_epochs}, {self.batch_size}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"TrainConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.gamma_pos < 0 or self.gamma_neg < 0 or not 0 <= self.clip < 1:
            raise ConfigError(
                f"asymmetric loss needs gamma_pos, gamma_neg >= 0 and clip in [0, 1), got "
                f"{self.gamma_pos}, {self.gamma_neg}, {self.clip}"
            )


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns: its new trainable state, the number of examples it trained on, and metrics."""

    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def batch_loss(method: Method, data: FeatureData, index: Tensor, config: TrainConfig) -> Tensor:
    """Per-sample asymmetric losses (B,) of rows ``index`` (targets -1 are ignored)."""
    logits = method(data.global_features[index], data.patch_features[index])
    targets = torch.from_numpy(data.labels[index.numpy()].astype(np.float32))
    return asymmetric_loss(logits, targets, config.gamma_pos, config.gamma_neg, config.clip)


def client_update(method: Method, state: State, data: FeatureData, config: TrainConfig) -> ClientUpdate:
    """Train ``method`` from ``state`` on ``data`` for ``config.local_epochs`` epochs of SGD.

    Shuffling is drawn from ``torch.Generator(config.seed)``; the same inputs give the same update.
    """
    if len(data) == 0:
        raise ConfigError("client_update got an empty dataset")
    method.load_trainable_state(state)
    method.train()
    params = list(method.trainable_parameters().values())
    if not params:
        return ClientUpdate(method.trainable_state(), len(data), {"loss": float("nan"), "steps": 0.0})
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps, total, count = 0, 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), config.batch_size):
            index = order[start : start + config.batch_size]
            losses = batch_loss(method, data, index, config)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(losses.detach().sum())
            count += len(index)
            steps += 1
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if config.max_steps is not None and steps >= config.max_steps:
            break
    method.eval()
    return ClientUpdate(method.trainable_state(), len(data), {"loss": total / max(count, 1), "steps": float(steps)})


@torch.no_grad()
def predict(method: Method, state: State | None, data: FeatureData, batch_size: int = 512) -> np.ndarray:
    """Sigmoid scores (n, C) of ``data`` under ``state`` (or the method's current state when None)."""
    if state is not None:
        method.load_trainable_state(state)
    method.eval()
    text = method.text_features()
    scores = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        scores.append(torch.sigmoid(method.logits(data.global_features[sl], data.patch_features[sl], text)))
    return torch.cat(scores).numpy()


def evaluate(method: Method, state: State | None, data: FeatureData) -> MultiLabelMetrics:
    """Multi-label metrics (mAP, CF1, OF1, ...) of ``state`` on ``data``."""
    return multilabel_metrics(predict(method, state, data), data.labels)


def fedavg(updates: Sequence[ClientUpdate]) -> State:
    """FedAvg: the average of the states weighted by example counts (accumulated in float64)."""
    if not updates:
        raise ConfigError("fedavg needs at least one update")
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ConfigError(f"fedavg: example counts must be positive, got {[u.num_examples for u in updates]}")
    names = set(updates[0].state)
    for u in updates[1:]:
        if set(u.state) != names:
            raise ConfigError(f"fedavg: updates disagree on tensor names: {sorted(names ^ set(u.state))}")
    out: State = {}
    for name in updates[0].state:
        acc = sum(u.state[name].to(torch.float64) * (u.num_examples / total) for u in updates)
        out[name] = torch.as_tensor(acc).to(torch.float32)
    return out


def extract_features(
    backbone: Backbone,
    dataset: Any,
    labels: np.ndarray,
    *,
    data_id: str,
    cache: FeatureCache | None = None,
    batch_size: int = 256,
) -> FeatureData:
    """Frozen global and patch features of ``dataset`` (yielding (image tensor, labels)), cached when possible."""

    def compute() -> tuple[Tensor, Tensor]:
        return encode_dataset(backbone.encode_image_tokens, dataset, batch_size)

    if cache is None:
        g, p = compute()
    else:
        key = FeatureKey(model_id=backbone.fingerprint, data_id=data_id, transform_id=f"{backbone.name}:tokens/1")
        g, p = cache.get_or_compute(key, compute)
    return FeatureData(g.float(), p.float(), np.asarray(labels))
