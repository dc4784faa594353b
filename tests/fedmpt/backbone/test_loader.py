"""Backbone loader: frozen eval-mode CLIP, feature shapes and identities, tiny-CLIP checkpoints, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedmpt.backbone.loader import (
    TINY_CLIP,
    WEIGHTS_ENV,
    Backbone,
    bundled_weights_path,
    load_backbone,
    save_tiny_clip,
)
from fedmpt.errors import BackboneUnavailableError


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(random_init=True)


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone: Backbone) -> None:
    assert all(not p.requires_grad for p in backbone.clip.parameters())
    backbone.clip.train()
    assert not backbone.clip.training and not any(m.training for m in backbone.clip.modules())


def test_global_and_patch_features_follow_open_clip(backbone: Backbone) -> None:
    x = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    g, p = backbone.encode_image_tokens(x)
    assert g.shape == (3, backbone.embed_dim) and p.shape == (3, 64, backbone.embed_dim)
    torch.testing.assert_close(g, backbone.model.encode_image(x))
    # Patch features are ln_post'd tokens projected by the same matrix as the pooled token.
    visual = backbone.model.visual
    tokens = visual.transformer(visual._embeds(x))
    torch.testing.assert_close(p, visual.ln_post(tokens)[:, 1:] @ visual.proj)


def test_text_from_embeddings_equals_text_from_ids(backbone: Backbone) -> None:
    tokens = backbone.tokenize(["a photo of a star.", "a striped background"])
    via_ids = backbone.encode_text(tokens)
    via_embeddings = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens)
    torch.testing.assert_close(via_ids, via_embeddings)


def test_tiny_checkpoint_round_trip_keeps_the_used_token_rows(backbone: Backbone, tmp_path: Path) -> None:
    text = ["a photo of a star."]
    used = backbone.tokenize(text).unique().tolist()
    path = tmp_path / "tiny.safetensors"
    save_tiny_clip(backbone.model, path, used, {"seed": "0"})
    loaded = load_backbone(TINY_CLIP, checkpoint=path)
    # fp16 storage: features agree to fp16 precision.
    a = F.normalize(backbone.encode_text(backbone.tokenize(text)), dim=-1)
    b = F.normalize(loaded.encode_text(loaded.tokenize(text)), dim=-1)
    assert float((a * b).sum()) > 0.999
    assert loaded.fingerprint != backbone.fingerprint and len(loaded.fingerprint) == 64


def test_missing_corrupt_and_unknown_weights_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailableError, match="does not exist"):
        load_backbone(TINY_CLIP, checkpoint=tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneUnavailableError, match="cannot read"):
        load_backbone(TINY_CLIP, checkpoint=bad)
    with pytest.raises(BackboneUnavailableError, match="unknown open_clip model"):
        load_backbone("ViT-Z-99")
    with pytest.raises(BackboneUnavailableError, match="no pretrained tag"):
        load_backbone("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(BackboneUnavailableError, match="needs pretrained"):
        load_backbone("ViT-B-32")


def test_pretrained_weights_offline_fail_fast_with_a_clear_message() -> None:
    code = (
        "from fedmpt.backbone.loader import load_backbone\n"
        "try:\n    load_backbone('ViT-B-32', pretrained='openai')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "BackboneUnavailableError" in out.stdout and "offline" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stdout
    assert time.perf_counter() - start < 60


def test_weights_env_override_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.safetensors"))
    try:
        path = bundled_weights_path()
    except BackboneUnavailableError as err:
        assert str(tmp_path) in str(err)
    else:  # the packaged file exists: the override is first in the list but missing, so the package wins
        assert path.name == f"{TINY_CLIP}.safetensors"
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"x")
    monkeypatch.setenv(WEIGHTS_ENV, str(real))
    assert bundled_weights_path() == real
