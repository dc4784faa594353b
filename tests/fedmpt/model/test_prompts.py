"""Prompt bank: learned slots spliced into frozen embeddings equal encoding the equivalent text exactly."""

from __future__ import annotations

import pytest
import torch

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.errors import ConfigError
from fedmpt.model.prompts import PromptBank, Slot, Text, conditional_prompts, context_prompts


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(random_init=True)


def _word_embeddings(backbone: Backbone, words: list[str]) -> torch.Tensor:
    ids = torch.tensor([backbone.tokenizer.encode(w)[0] for w in words])  # type: ignore[attr-defined]
    return backbone.model.token_embedding(ids).detach()


def test_conditional_prompts_equal_the_full_text_when_slots_hold_word_embeddings(backbone: Backbone) -> None:
    conditions, classes = ["spatial layout", "lighting"], ["star", "house"]
    bank = PromptBank(backbone, *conditional_prompts(conditions, classes, 4, 4))
    v = [["a", "photo", "with", "the"], ["one", "more", "odd", "image"]]
    u = ["of", "a", "big", "shiny"]
    with torch.no_grad():
        bank.condition_context.copy_(torch.cat([_word_embeddings(backbone, w) for w in v]))
        bank.class_context.copy_(_word_embeddings(backbone, u))
    texts = [f"{' '.join(v[n])} {c} {' '.join(u)} {k}." for n, c in enumerate(conditions) for k in classes]
    expected = backbone.encode_text(backbone.tokenize(texts))
    torch.testing.assert_close(bank(), expected, rtol=0, atol=1e-6)


def test_every_token_of_a_multi_word_condition_is_kept(backbone: Backbone) -> None:
    bank = PromptBank(backbone, *conditional_prompts(["spatial layout"], ["star"], 2, 2))
    encode = backbone.tokenizer.encode  # type: ignore[attr-defined]
    row = bank.tokens[0].tolist()
    body = encode("spatial layout")
    assert len(body) == 2
    assert row[1 + 2 : 1 + 2 + 2] == body  # after SOT and two condition-context slots


def test_slot_gradients_reach_only_the_learned_vectors(backbone: Backbone) -> None:
    bank = PromptBank(backbone, *context_prompts(["star", "tree"], 3))
    bank().sum().backward()
    assert bank.context.grad is not None and bank.context.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_too_long_prompt_is_rejected_with_its_length(backbone: Backbone) -> None:
    long_class = " ".join(["star"] * 40)
    with pytest.raises(ConfigError, match="context length"):
        PromptBank(backbone, [[Slot("ctx", 0), Text(long_class)]], {"ctx": 1})


def test_slot_outside_its_group_is_rejected(backbone: Backbone) -> None:
    with pytest.raises(ConfigError, match="outside the groups"):
        PromptBank(backbone, [[Slot("ctx", 5), Text("star")]], {"ctx": 2})
