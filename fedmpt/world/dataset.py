"""Datasets of the synthetic world, and the federated benchmark built from per-client scene distributions.

Every image is a pure function of (seed, stream, index): the scene of row ``i`` is drawn from its own
``numpy.random.Generator`` seeded with ``[seed, *stream, i]``, so datasets are deterministic, random-access and
independent of the order in which rows are rendered. Images are rendered on first access and kept in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmpt.errors import ConfigError
from fedmpt.world.captions import caption
from fedmpt.world.factors import BACKGROUND, CONDITION_FACTORS, TASK_CLASSES
from fedmpt.world.render import render_scene
from fedmpt.world.scene import Scene, SceneDistribution, cross_group_pairs

# CLIP's normalisation constants (open_clip OPENAI_DATASET_MEAN / STD), used by the bundled tiny CLIP too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WorldDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``n`` scenes drawn from ``distribution``; items are (normalised image tensor (3, S, S), labels (C,)).

    Attributes:
        classnames: the class names, columns of ``labels``.
        labels: (n, C) int8 multi-hot matrix (1 positive, 0 negative).
        conditions: (n, 5) int64 value index of each condition factor (``CONDITION_FACTORS`` order).
        paths: empty (images live in memory, not in files).
    """

    def __init__(
        self,
        distribution: SceneDistribution,
        n: int,
        *,
        seed: int,
        stream: tuple[int, ...] = (0,),
        name: str = "synthetic",
        split: str = "train",
        image_size: int = 64,
        patch_size: int = 8,
        output_size: int | None = None,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        if n < 1:
            raise ConfigError(f"a world dataset needs at least one image, got n={n}")
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.distribution = distribution
        self.seed = int(seed)
        self.stream = tuple(int(s) for s in stream)
        self.name = name
        self.split = split
        self.image_size = image_size
        self.patch_size = patch_size
        self.output_size = output_size or image_size
        self.classnames: tuple[str, ...] = distribution.classes
        self.paths: list[str] = []
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)
        self.scenes: list[Scene] = [distribution.sample(self._rng(i, 0)) for i in range(n)]
        self.labels = np.stack([distribution.labels(s) for s in self.scenes])
        self.conditions = np.array([s.conditions for s in self.scenes], dtype=np.int64)
        self._images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
        self._rendered = np.zeros(n, dtype=bool)

    def _rng(self, index: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *self.stream, index, purpose])

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, index: int) -> np.ndarray:
        """The (S, S, 3) uint8 image of row ``index`` (rendered on first access)."""
        if not self._rendered[index]:
            rendered = render_scene(
                self.scenes[index], self._rng(index, 1), self.image_size, self.patch_size, with_coverage=False
            )
            self._images[index] = rendered.image
            self._rendered[index] = True
        return self._images[index]

    def images(self) -> np.ndarray:
        """All images as an (n, S, S, 3) uint8 array (renders what is missing)."""
        for i in np.flatnonzero(~self._rendered):
            self.image(int(i))
        return self._images

    def patch_coverage(self, index: int) -> np.ndarray:
        """(C, G, G) fraction of each patch covered by each class of ``classnames`` (G = S / patch).

        Renders the scene again (the image is kept too), so asking for both costs one render.
        """
        rendered = render_scene(self.scenes[index], self._rng(index, 1), self.image_size, self.patch_size)
        self._images[index] = rendered.image
        self._rendered[index] = True
        grid = self.image_size // self.patch_size
        out = np.zeros((len(self.classnames), grid, grid), dtype=np.float32)
        for cls, cov in rendered.patch_coverage.items():
            out[self.classnames.index(cls)] = cov
        return out

    def caption(self, index: int, variant: int = 0) -> str:
        """Caption number ``variant`` of row ``index`` (deterministic; different variants word it differently)."""
        return caption(self.scenes[index], self._rng(index, 2 + variant)).text

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """Normalise uint8 images (..., S, S, 3) into float tensors (..., 3, S', S') for the backbone."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = x.movedim(-1, -3)
        if self.output_size != self.image_size:
            flat = x.reshape(-1, *x.shape[-3:])
            flat = torch.nn.functional.interpolate(
                flat, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False
            )
            x = flat.reshape(*x.shape[:-3], *flat.shape[-3:])
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_tensor(self.image(index)), torch.from_numpy(self.labels[index].astype(np.float32))

    def fingerprint(self) -> str:
        """sha256 of everything that determines the data: distribution, seed, stream, sizes and length."""
        payload = json.dumps(
            {
                "distribution": repr(self.distribution),
                "seed": self.seed,
                "stream": self.stream,
                "n": len(self),
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "output_size": self.output_size,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class FederatedWorldConfig:
    """The knobs of the federated spurious-correlation benchmark.

    Args:
        num_clients: number of clients.
        train_per_client, test_per_client: images per client split.
        global_test_size: images in each global test split (in-distribution and decorrelated).
        context_strength: oracle co-occurrence strength (probability an object comes from its background group).
        spurious_strength: per-client probability of adding the spurious partner of a present class.
        pairs_per_client: spurious pairs per client (cross-group pairs, distinct between clients where possible).
        background_concentration: Dirichlet concentration of each client's background mix (small = label skew).
        seed: seed of everything.
    """

    num_clients: int = 5
    train_per_client: int = 400
    test_per_client: int = 200
    global_test_size: int = 1000
    context_strength: float = 0.75
    spurious_strength: float = 0.9
    pairs_per_client: int = 1
    background_concentration: float = 1.0
    seed: int = 0
    image_size: int = 64
    classes: tuple[str, ...] = field(default=TASK_CLASSES)

    def __post_init__(self) -> None:
        for name in (
            "num_clients",
            "train_per_client",
            "test_per_client",
            "global_test_size",
            "pairs_per_client",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.background_concentration <= 0:
            raise ConfigError(f"background_concentration must be > 0, got {self.background_concentration}")


@dataclass(frozen=True)
class ClientWorld:
    """One client's data: its train and in-distribution test split and the spurious pairs it sees."""

    train: WorldDataset
    test: WorldDataset
    spurious_pairs: tuple[tuple[str, str], ...]
    background_probs: tuple[float, ...]


@dataclass(frozen=True)
class FederatedWorld:
    """The federated benchmark: clients plus the global in-distribution and decorrelated test splits."""

    config: FederatedWorldConfig
    clients: tuple[ClientWorld, ...]
    test_in_distribution: WorldDataset
    test_decorrelated: WorldDataset

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.config.classes

    def describe(self) -> dict[str, object]:
        """A JSON-able description: config, spurious pairs and background mixes per client."""
        return {
            "config": asdict(self.config),
            "clients": [
                {"spurious_pairs": c.spurious_pairs, "background_probs": c.background_probs} for c in self.clients
            ],
        }


def make_federated_world(config: FederatedWorldConfig) -> FederatedWorld:
    """Build the federated benchmark (see :mod:`fedmpt.world.scene` for the distributions)."""
    rng = np.random.default_rng([config.seed, 99])
    pairs = cross_group_pairs(config.classes)
    order = rng.permutation(len(pairs))
    needed = config.num_clients * config.pairs_per_client
    chosen = [pairs[int(order[i % len(order)])] for i in range(needed)]
    clients = []
    for k in range(config.num_clients):
        own = tuple(chosen[k * config.pairs_per_client : (k + 1) * config.pairs_per_client])
        draw = rng.dirichlet([config.background_concentration] * len(BACKGROUND.values))
        bg = tuple(float(p) for p in draw / draw.sum())
        dist = SceneDistribution(
            classes=config.classes,
            background_probs=bg,
            context_strength=config.context_strength,
            spurious_pairs=own,
            spurious_strength=config.spurious_strength,
        )
        seed, size = config.seed, config.image_size
        clients.append(
            ClientWorld(
                train=WorldDataset(
                    dist, config.train_per_client, seed=seed, stream=(1, k), split=f"client{k}-train", image_size=size
                ),
                test=WorldDataset(
                    dist, config.test_per_client, seed=seed, stream=(2, k), split=f"client{k}-test", image_size=size
                ),
                spurious_pairs=own,
                background_probs=bg,
            )
        )
    oracle = SceneDistribution(classes=config.classes, context_strength=config.context_strength)
    broken = SceneDistribution(
        classes=config.classes,
        context_strength=config.context_strength,
        broken_pairs=tuple(dict.fromkeys(chosen)),
    )
    n, seed, size = config.global_test_size, config.seed, config.image_size
    return FederatedWorld(
        config=config,
        clients=tuple(clients),
        test_in_distribution=WorldDataset(oracle, n, seed=seed, stream=(3,), split="test-iid", image_size=size),
        test_decorrelated=WorldDataset(broken, n, seed=seed, stream=(4,), split="test-decorrelated", image_size=size),
    )


def condition_names() -> tuple[str, ...]:
    """The five condition factor names, in the order of ``WorldDataset.conditions`` columns."""
    return tuple(f.name for f in CONDITION_FACTORS)
