"""Frozen CLIP backbones: any open_clip model (pretrained tag or local checkpoint) or the bundled tiny CLIP.

The backbone is always frozen (``requires_grad=False`` everywhere) and always in eval mode, even when a parent
module calls ``.train()``: training never changes a backbone statistic (there are none in a ViT, but dropout
and any future normalisation would be batch-coupled, which per-sample DP forbids).

The bundled tiny CLIP (``fedmpt-tiny-clip``) is an open_clip model config registered from
``fedmpt/backbone/model_configs``; its weights were pretrained by ``experiments/pretrain_tiny_clip.py`` on the
synthetic world and ship as ``fedmpt/backbone/weights/fedmpt-tiny-clip.safetensors``. Only the token-embedding
rows of BPE tokens the world uses are stored; the others are filled with the mean of the stored rows at load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedmpt.errors import BackboneUnavailableError

logger = logging.getLogger(__name__)

TINY_CLIP = "fedmpt-tiny-clip"
CHECKPOINT_FORMAT = "fedmpt-tiny-clip/1"
WEIGHTS_ENV = "FEDMPT_TINY_CLIP_WEIGHTS"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_WEIGHTS_NAME = f"{TINY_CLIP}.safetensors"
_ROWS_KEY = "token_embedding.rows"
_VALUES_KEY = "token_embedding.values"


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence open_clip's root-logger chatter (e.g. "No pretrained weights loaded" before we load ours)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def register_model_configs() -> None:
    """Register the project's open_clip model configs (idempotent)."""
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


class FrozenCLIP(nn.Module):
    """An open_clip CLIP model that is frozen and stays in eval mode whatever ``train()`` is called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenCLIP:  # noqa: ARG002 - the mode is deliberately ignored
        return super().train(False)


@dataclass
class Backbone:
    """A frozen CLIP with its tokenizer and image transform.

    Attributes:
        name: open_clip model name.
        source: where the weights came from (pretrained tag, file path, or the bundled file).
        clip: the frozen model (a :class:`FrozenCLIP`).
        tokenizer: open_clip tokenizer (texts -> (T, L) int64 tokens).
        preprocess: PIL image -> normalised tensor, open_clip's eval transform.
        image_size, embed_dim, context_length: shapes.
        fingerprint: sha256 of the weights, used as a cache key.
    """

    name: str
    source: str
    clip: FrozenCLIP
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    image_size: int
    embed_dim: int
    context_length: int
    fingerprint: str

    @property
    def model(self) -> Any:
        """The open_clip CLIP model (typed ``Any``: open_clip's modules are untyped attribute bags)."""
        return self.clip.model

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize ``texts`` to (T, context_length) int64."""
        return self.tokenizer(list(texts))

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global and patch features in the joint embedding space, unnormalised.

        Returns ``(global, patches)`` with shapes (B, D) and (B, M, D): the pooled token projected by
        ``visual.proj``, and every patch token after ``ln_post`` projected by the same matrix (the usual dense
        CLIP reading, as DualCoOp uses it).
        """
        visual = self.model.visual
        x = visual._embeds(images)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj
        return pooled, tokens

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features (T, D), unnormalised, of tokenized texts."""
        return self.model.encode_text(tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features (T, D) from token embeddings (T, L, W) instead of ids (prompt tuning).

        ``tokens`` (T, L) locate the end-of-text token, whose output is pooled as open_clip does (argmax id).
        """
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + m.positional_embedding.to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        eot = tokens.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if m.text_projection is not None:
            x = x @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(x)
        return x

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings (T, L, W) of token ids."""
        return self.model.token_embedding(tokens)


def _weights_candidates() -> list[Path]:
    """Places the bundled weights may be, in order: env override, this package, the installed distribution.

    The installed distribution is consulted because Flower may import this package from an app bundle (FAB)
    that carries only source files, not the ``.safetensors`` file.
    """
    out: list[Path] = []
    if os.environ.get(WEIGHTS_ENV):
        out.append(Path(os.environ[WEIGHTS_ENV]))
    out.append(Path(__file__).parent / "weights" / _WEIGHTS_NAME)
    try:
        dist = importlib.metadata.distribution("fedmpt")
    except importlib.metadata.PackageNotFoundError:
        return out
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            out.append(Path(url[len("file://") :]) / "fedmpt" / "backbone" / "weights" / _WEIGHTS_NAME)
    out.append(Path(str(dist.locate_file(f"fedmpt/backbone/weights/{_WEIGHTS_NAME}"))))
    return out


def bundled_weights_path() -> Path:
    """Path of the bundled tiny-CLIP weights; raises :class:`BackboneUnavailableError` if none is found."""
    candidates = list(dict.fromkeys(_weights_candidates()))
    for path in candidates:
        if path.is_file():
            return path
    raise BackboneUnavailableError(
        f"the bundled {TINY_CLIP} weights were not found; looked in: {', '.join(map(str, candidates))}. "
        f"Reinstall fedmpt, set {WEIGHTS_ENV}, or recreate them with experiments/pretrain_tiny_clip.py"
    )


def save_tiny_clip(model: nn.Module, path: Path, used_token_ids: Sequence[int], metadata: dict[str, str]) -> None:
    """Save a tiny-CLIP state dict keeping only the token-embedding rows in ``used_token_ids`` (fp16 floats)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    rows = torch.tensor(sorted({int(i) for i in used_token_ids}), dtype=torch.int64)
    state[_ROWS_KEY] = rows
    state[_VALUES_KEY] = table[rows].clone()
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT, **metadata})
    os.replace(tmp, path)


def _load_tiny_state(path: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise BackboneUnavailableError(f"cannot read tiny-CLIP weights {path}: {err}") from err
    if _ROWS_KEY not in state or _VALUES_KEY not in state:
        raise BackboneUnavailableError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (no token rows)")
    rows, values = state.pop(_ROWS_KEY), state.pop(_VALUES_KEY).float()
    table = values.mean(dim=0, keepdim=True).repeat(vocab_size, 1)
    table[rows] = values
    state["token_embedding.weight"] = table
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finish(name: str, source: str, model: Any, preprocess: Any, fingerprint: str) -> Backbone:
    with _quiet_root_logger():
        tokenizer = open_clip.get_tokenizer(name)
    visual = model.visual
    size = visual.image_size
    image_size = int(size[0] if isinstance(size, tuple | list) else size)
    return Backbone(
        name=name,
        source=source,
        clip=FrozenCLIP(model),
        tokenizer=tokenizer,
        preprocess=preprocess,
        image_size=image_size,
        embed_dim=int(model.text_projection.shape[-1]),
        context_length=int(model.context_length),
        fingerprint=fingerprint,
    )


def load_backbone(
    name: str = TINY_CLIP,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
) -> Backbone:
    """Load a frozen CLIP backbone.

    Args:
        name: an open_clip model name (e.g. ``"ViT-B-16"``) or ``"fedmpt-tiny-clip"`` (the default).
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``); needs the weights in the local cache or
            network access to the hub.
        checkpoint: a local checkpoint file for ``name`` (open_clip state dict); for the tiny CLIP, a
            ``fedmpt-tiny-clip/1`` safetensors file instead of the bundled one.
        random_init: build ``name`` with random weights (for shapes, parameter counts and timing only).

    Raises:
        BackboneUnavailableError: the weights cannot be had (offline, missing or unreadable file, unknown name).
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise BackboneUnavailableError(
            f"unknown open_clip model {name!r}; e.g. {TINY_CLIP!r}, 'ViT-B-16', 'ViT-B-32' (open_clip.list_models())"
        )
    if sum(x is not None and x is not False for x in (pretrained, checkpoint, random_init or None)) > 1:
        raise BackboneUnavailableError("give at most one of pretrained=, checkpoint=, random_init=True")
    if random_init:
        with _quiet_root_logger():
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        return _finish(name, "random-init", model, preprocess, f"random-init:{name}")
    if name == TINY_CLIP and pretrained is None:
        path = Path(checkpoint) if checkpoint is not None else bundled_weights_path()
        if not path.is_file():
            raise BackboneUnavailableError(f"tiny-CLIP checkpoint {path} does not exist")
        with _quiet_root_logger():
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        state = _load_tiny_state(path, model.vocab_size)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneUnavailableError(f"{path} does not match {name}: missing {missing}, unexpected {unexpected}")
        return _finish(name, str(path), model, preprocess, _file_fingerprint(path))
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise BackboneUnavailableError(f"checkpoint file {path} for {name} does not exist")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
        except Exception as err:  # open_clip raises RuntimeError/KeyError/ValueError for bad files
            raise BackboneUnavailableError(f"cannot load checkpoint {path} into {name}: {err}") from err
        return _finish(name, str(path), model, preprocess, _file_fingerprint(path))
    if pretrained is None:
        raise BackboneUnavailableError(
            f"{name} needs pretrained=<tag> (see open_clip.list_pretrained()) or checkpoint=<file>; "
            "use random_init=True only for shapes and timing"
        )
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise BackboneUnavailableError(
            f"{name} has no pretrained tag {pretrained!r}; known: {open_clip.list_pretrained_tags_by_model(name)}"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as err:  # hub clients raise many types when offline
        raise BackboneUnavailableError(
            f"the weights of {name} ({pretrained}) cannot be had offline and could not be downloaded "
            f"({type(err).__name__}). Download them where there is internet, then pass checkpoint=<file>."
        ) from err
    return _finish(name, f"{name}:{pretrained}", model, preprocess, f"open_clip:{name}:{pretrained}")
