"""Learnable text prompts: learned token vectors spliced into frozen token embeddings of a CLIP text encoder.

A prompt is a sequence of *segments*: frozen text (every BPE token of it is kept) or a learned slot that reads
vector ``i`` of a named parameter group. FedMPT's conditional prompts are

    [SOT] V_n,1 .. V_n,bcond  <condition n text>  U_1 .. U_bcls  <class c text> . [EOT]

with ``V`` learned per condition and ``U`` shared; CoOp (PromptFL) prompts are ``[ctx_1..ctx_k] <class> .``.
All prompts of a bank are encoded by the frozen text encoder in one batched pass. Token ids are assembled
segment by segment, so the learned slots sit at known positions and no word of the condition or class text is
dropped (the authors' public code keeps only the first token of a multi-word condition).

Only open_clip's CLIP BPE tokenizer (``SimpleTokenizer``) is supported: the one of OpenAI/LAION CLIP models and
of the bundled tiny CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedmpt.backbone.loader import Backbone
from fedmpt.errors import ConfigError


@dataclass(frozen=True)
class Text:
    """A frozen text segment."""

    text: str


@dataclass(frozen=True)
class Slot:
    """A learned token: vector ``index`` of parameter group ``group``."""

    group: str
    index: int


Segment = Text | Slot


class PromptBank(nn.Module):
    """A batch of prompts with learned slots; ``forward()`` returns their text features (P, D).

    Args:
        backbone: the frozen CLIP (its tokenizer, token embedding and text encoder are used, never trained).
        prompts: each prompt as a list of segments; a period and the end-of-text token are appended.
        groups: number of vectors of each learned group.
        init_std: learned vectors start as N(0, init_std^2) (CoOp's and the authors' 0.02).
        generator: RNG of the initialisation.
        init: starting values ``(count, W)`` for some groups (e.g. CoOp's ``ctx_init`` token embeddings).

    The learned vectors are parameters named ``<group>`` of shape (count, W); the frozen token embeddings of
    all prompts are a buffer, and the splice is an ``index_put`` so that ``torch.func`` transforms see a pure
    function of the parameters.
    """

    tokens: Tensor
    frozen_embeddings: Tensor
    slot_prompt: Tensor
    slot_position: Tensor

    def __init__(
        self,
        backbone: Backbone,
        prompts: Sequence[Sequence[Segment]],
        groups: dict[str, int],
        *,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        init: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not prompts:
            raise ConfigError("a prompt bank needs at least one prompt")
        tokenizer: Any = backbone.tokenizer
        for attr in ("encode", "sot_token_id", "eot_token_id"):
            if not hasattr(tokenizer, attr):
                raise ConfigError(
                    f"prompt tuning needs open_clip's CLIP BPE tokenizer; {backbone.name} uses "
                    f"{type(tokenizer).__name__}"
                )
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: frozen and shared
        length = backbone.context_length
        rows: list[list[int]] = []
        slot_prompt: list[int] = []
        slot_position: list[int] = []
        slot_group: list[str] = []
        slot_index: list[int] = []
        for p, segments in enumerate(prompts):
            ids = [tokenizer.sot_token_id]
            for seg in segments:
                if isinstance(seg, Text):
                    ids.extend(tokenizer.encode(seg.text))
                else:
                    if seg.group not in groups or not 0 <= seg.index < groups[seg.group]:
                        raise ConfigError(f"prompt {p}: slot {seg} is outside the groups {groups}")
                    slot_prompt.append(p)
                    slot_position.append(len(ids))
                    slot_group.append(seg.group)
                    slot_index.append(seg.index)
                    ids.append(tokenizer.encode("x")[0])  # placeholder id, replaced by the learned vector
            ids.extend(tokenizer.encode("."))
            ids.append(tokenizer.eot_token_id)
            if len(ids) > length:
                raise ConfigError(
                    f"prompt {p} needs {len(ids)} tokens but the text encoder's context length is {length}: {segments}"
                )
            rows.append(ids + [0] * (length - len(ids)))
        tokens = torch.tensor(rows, dtype=torch.long)
        self.register_buffer("tokens", tokens, persistent=False)
        with torch.no_grad():
            frozen = backbone.token_embedding(tokens).detach().clone()
        self.register_buffer("frozen_embeddings", frozen, persistent=False)
        width = frozen.shape[-1]
        self.group_names = tuple(groups)
        for name, count in groups.items():
            start = torch.randn(count, width, generator=generator) * init_std
            if init is not None and name in init:
                if tuple(init[name].shape) != (count, width):
                    shape = tuple(init[name].shape)
                    raise ConfigError(f"init of group {name!r} has shape {shape}, not {(count, width)}")
                start = init[name].detach().clone().to(start.dtype)
            self.register_parameter(name, nn.Parameter(start))
        self.register_buffer("slot_prompt", torch.tensor(slot_prompt, dtype=torch.long), persistent=False)
        self.register_buffer("slot_position", torch.tensor(slot_position, dtype=torch.long), persistent=False)
        for name in groups:
            members = [i for i, g in enumerate(slot_group) if g == name]
            self.register_buffer(f"_slots_{name}", torch.tensor(members, dtype=torch.long), persistent=False)
            self.register_buffer(
                f"_index_{name}",
                torch.tensor([slot_index[i] for i in members], dtype=torch.long),
                persistent=False,
            )

    @property
    def backbone(self) -> Backbone:
        backbone: Backbone = self.__dict__["_backbone"]
        return backbone

    def embeddings(self) -> Tensor:
        """Token embeddings (P, L, W) with the learned vectors spliced in."""
        values = []
        positions = []
        for name in self.group_names:
            slots: Tensor = getattr(self, f"_slots_{name}")
            index: Tensor = getattr(self, f"_index_{name}")
            if len(slots):
                values.append(getattr(self, name)[index])
                positions.append(slots)
        frozen = self.frozen_embeddings
        if not values:
            return frozen
        order = torch.cat(positions)
        vectors = torch.cat(values)  # (S, W)
        return frozen.index_put((self.slot_prompt[order], self.slot_position[order]), vectors.to(frozen.dtype))

    def forward(self) -> Tensor:
        """Text features (P, D) of all prompts, unnormalised, from one pass of the frozen text encoder."""
        return self.backbone.encode_text_embeddings(self.embeddings(), self.tokens)


def conditional_prompts(
    conditions: Sequence[str], classnames: Sequence[str], n_condition_context: int, n_class_context: int
) -> tuple[list[list[Segment]], dict[str, int]]:
    """FedMPT's N x C prompts ``[V_n,1..V_n,bcond] [COND_n] [U_1..U_bcls] [CLASS_c]`` (condition-major order).

    ``V`` is the group ``condition_context`` with ``N * bcond`` vectors (condition n uses rows
    ``n*bcond .. n*bcond+bcond-1``); ``U`` is ``class_context`` with ``bcls`` vectors shared by all prompts.
    """
    if n_condition_context < 0 or n_class_context < 0:
        raise ConfigError(f"context lengths must be >= 0, got {n_condition_context}, {n_class_context}")
    prompts: list[list[Segment]] = []
    for n, condition in enumerate(conditions):
        for classname in classnames:
            segs: list[Segment] = [
                Slot("condition_context", n * n_condition_context + i) for i in range(n_condition_context)
            ]
            segs.append(Text(condition))
            segs.extend(Slot("class_context", i) for i in range(n_class_context))
            segs.append(Text(classname.replace("_", " ")))
            prompts.append(segs)
    groups = {"condition_context": len(conditions) * n_condition_context, "class_context": n_class_context}
    return prompts, {k: v for k, v in groups.items() if v > 0}


def context_prompts(
    classnames: Sequence[str], n_context: int, group: str = "context"
) -> tuple[list[list[Segment]], dict[str, int]]:
    """CoOp prompts ``[ctx_1..ctx_k] [CLASS_c]`` with one context shared by all classes."""
    if n_context < 1:
        raise ConfigError(f"n_context must be >= 1, got {n_context}")
    prompts: list[list[Segment]] = [
        [*(Slot(group, i) for i in range(n_context)), Text(c.replace("_", " "))] for c in classnames
    ]
    return prompts, {group: n_context}
