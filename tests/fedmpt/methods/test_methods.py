"""Methods: shapes, ablation switches, init invariants, per-sample independence, state round trips."""

from __future__ import annotations

import pytest
import torch

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.errors import ConfigError
from fedmpt.methods import METHODS, build_method
from fedmpt.methods.base import MethodConfig
from fedmpt.methods.fedmpt import VARIANTS
from fedmpt.model.asymmetric_loss import asymmetric_loss

CONDITIONS = ("spatial layout", "object pose", "background")
CLASSES = ("star", "tree", "house", "heart")


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(random_init=True)


def _features(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 128, generator=g), torch.randn(b, 64, 128, generator=g)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_finite_logits_of_shape_batch_by_classes(backbone: Backbone, name: str) -> None:
    method = build_method(name, backbone, CLASSES, CONDITIONS)
    g, p = _features()
    out = method(g, p)
    assert out.shape == (5, len(CLASSES)) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(n for n in METHODS if n != "zeroshot"))
def test_one_samples_loss_gradient_does_not_depend_on_other_samples(backbone: Backbone, name: str) -> None:
    method = build_method(name, backbone, CLASSES, CONDITIONS)
    g, p = _features()
    targets = torch.tensor([[1, 0, -1, 0]] * 5, dtype=torch.float32)

    def grads_of_first(gf: torch.Tensor, pf: torch.Tensor) -> list[torch.Tensor]:
        method.zero_grad()
        asymmetric_loss(method(gf, pf), targets)[0].backward()
        return [q.grad.clone() for q in method.trainable_parameters().values() if q.grad is not None]

    before = grads_of_first(g, p)
    g2, p2 = g.clone(), p.clone()
    g2[1:] = torch.randn_like(g2[1:]) * 3
    p2[1:] = torch.randn_like(p2[1:]) * 3
    after = grads_of_first(g2, p2)
    assert before and len(before) == len(after)
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_ablation_switches_build_exactly_the_named_parts(backbone: Backbone) -> None:
    for name, (prompts, adapters, transport, gate) in VARIANTS.items():
        method = build_method(name, backbone, CLASSES, CONDITIONS)
        names = " ".join(method.trainable_parameters())
        assert ("prompts." in names) == prompts, name
        assert ("adapters." in names) == adapters, name
        assert ("transport." in names) == transport, name
        assert ("gate." in names) == gate, name


def test_identity_adapters_and_uniform_gate_at_init_make_ablations_agree(backbone: Backbone) -> None:
    g, p = _features()
    cps = build_method("fedmpt-cps", backbone, CLASSES, CONDITIONS)(g, p)
    cps_adapters = build_method("fedmpt-cps-adapters", backbone, CLASSES, CONDITIONS)(g, p)
    torch.testing.assert_close(cps, cps_adapters)  # residual adapters start as the identity
    ot = build_method("fedmpt-ot", backbone, CLASSES, CONDITIONS)(g, p)
    full = build_method("fedmpt", backbone, CLASSES, CONDITIONS)(g, p)
    torch.testing.assert_close(ot, full)  # the gate starts uniform


def test_state_round_trip_and_mismatch_errors(backbone: Backbone) -> None:
    a = build_method("fedmpt", backbone, CLASSES, CONDITIONS, init_seed=1)
    b = build_method("fedmpt", backbone, CLASSES, CONDITIONS, init_seed=2)
    g, p = _features()
    assert not torch.allclose(a(g, p), b(g, p))
    b.load_trainable_state(a.trainable_state())
    torch.testing.assert_close(a(g, p), b(g, p))
    state = a.trainable_state()
    state.pop(next(iter(state)))
    with pytest.raises(ConfigError, match="lacks"):
        b.load_trainable_state(state)
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("fedmpt-nope", backbone, CLASSES, CONDITIONS)


def test_fedmpt_needs_conditions(backbone: Backbone) -> None:
    with pytest.raises(ConfigError, match="condition"):
        build_method("fedmpt", backbone, CLASSES, ())


def test_promptfl_starts_at_the_zero_shot_model(backbone: Backbone) -> None:
    """CoOp's ctx_init: PromptFL's context is the embedding of "a photo of", so its class features at
    initialisation are zero-shot CLIP's own and every per-class ranking (hence mAP) is identical."""
    from fedmpt.metrics import mean_average_precision

    classes = ("cat", "dog", "apple", "umbrella", "oven")
    zero = build_method("zeroshot", backbone, classes)
    prompt = build_method("promptfl", backbone, classes)
    assert torch.allclose(prompt.text_features(), zero.text_features(), atol=1e-5, rtol=1e-4)
    g, p = _features(64, seed=3)
    labels = (torch.rand(64, len(classes), generator=torch.Generator().manual_seed(1)) < 0.3).to(torch.int8)
    with torch.no_grad():
        ours = mean_average_precision(prompt(g, p).numpy(), labels.numpy())
        theirs = mean_average_precision(zero(g, p).numpy(), labels.numpy())
    assert ours == pytest.approx(theirs, abs=1e-9)
    random_init = build_method("promptfl", backbone, classes, config=MethodConfig(context_init=""))
    assert random_init.trainable_parameters()["prompts.context"].shape[0] == MethodConfig().n_context
    assert not torch.allclose(random_init.text_features(), zero.text_features(), atol=1e-3)
