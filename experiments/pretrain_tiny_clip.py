"""Pretrain the bundled tiny CLIP (``fedmpt-tiny-clip``) on the broader synthetic world, reproducibly from a seed.

Recipe (LiT-style, two stages; the pretraining world has all 16 glyph classes, object colours and every
condition drawn independently and uniformly, so no client's spurious pairing is ever taught):

1. **Image tower, supervised.** The open_clip ViT is trained from scratch with a *cosine* concept head on its
   pooled embedding (logit ``s * cos(x, w_k) + b_k``, one row per class and per condition value): multi-label BCE
   over the 16 classes, one cross-entropy per condition factor (layout, pose, background, lighting, scale), and a
   dense term: every projected patch token, read by the same class rows, predicts which classes cover that patch.
   The cosine form makes each row a direction that zero-shot scoring (a cosine with a prompt) can use as is; the
   dense term makes patch features meaningful in the joint space, which the region-level parts of FedMPT
   (adapters, optimal transport) and DualCoOp rely on.
2. **Text tower, aligned.** The image tower is frozen and the text tower (with the logit scale and bias) is
   trained with the sigmoid loss of SigLIP. open_clip's ``SigLipLoss`` assumes exactly one positive per row
   (the diagonal); our captions are sometimes short forms ("a photo of a star.") that are true of several images
   in a batch, so we use the same pairwise sigmoid loss with the true match matrix: caption j matches image i
   when every fact it claims holds in image i. Every batch also carries a *concept bank*: one short caption per
   class (wording drawn from ``CLASS_TEMPLATES``) and per condition value, weighted up (``--bank-weight``), and
   each bank caption's embedding is pulled towards its stage-1 head row (``--distill-weight``, cosine), so the
   text tower learns to name exactly the directions the image tower learned.

The checkpoint keeps only the token-embedding rows of the BPE tokens the world uses (fp16 storage), so it is a
few MB. Usage (about 17 minutes on 2 idle cores)::

    .venv/bin/python experiments/pretrain_tiny_clip.py --seed 0
    .venv/bin/python experiments/pretrain_tiny_clip.py --eval-only   # zero-shot report of the shipped weights
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from fedmpt.backbone.loader import TINY_CLIP, Backbone, load_backbone, register_model_configs, save_tiny_clip
from fedmpt.world.captions import Caption, caption, class_prompt, condition_prompts, condition_sentence, scene_facts
from fedmpt.world.dataset import FederatedWorldConfig, WorldDataset, make_federated_world
from fedmpt.world.factors import ALL_CLASSES, COLOURS, CONDITION_FACTORS
from fedmpt.world.scene import pretraining_distribution

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "fedmpt" / "backbone" / "weights" / f"{TINY_CLIP}.safetensors"
# Condition names of the paper and of the shipped conditions files: their tokens must exist in the checkpoint.
EXTRA_VOCABULARY = (
    "spatial layout, object pose, background, lighting, object scale, weather, lighting/weather, "
    "a photo of a, X, with, objects, the, and, all"
)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batch(seed: int, stage: int, step: int, size: int) -> WorldDataset:
    return WorldDataset(pretraining_distribution(), size, seed=seed, stream=(10 + stage, step), split="pretrain")


class CosineHead(torch.nn.Module):
    """Concept logits ``s * cos(x, w_k) + b_k``: one row ``w_k`` per class and per condition value.

    Zero-shot CLIP scores an image by the cosine between its embedding and a prompt's, so a head of this shape
    learns exactly the directions that the text tower must later produce for each concept's short caption.
    """

    def __init__(self, dim: int, rows: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(rows, dim) / math.sqrt(dim))
        self.bias = torch.nn.Parameter(torch.zeros(rows))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        w = F.normalize(self.weight[rows], dim=-1)
        return self.log_scale.exp() * F.normalize(x, dim=-1) @ w.T + self.bias[rows]


def train_image_tower(model: torch.nn.Module, args: argparse.Namespace, log: list[dict]) -> CosineHead:
    """Stage 1: supervised concept head (classes, condition factors, dense patch classes) on the ViT."""
    visual = model.visual
    num_cls = len(ALL_CLASSES)
    sizes = [len(f.values) for f in CONDITION_FACTORS]
    head = CosineHead(model.text_projection.shape[1], num_cls + sum(sizes))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.05)
    visual.train()
    for step in range(args.stage1_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.stage1_steps, args.lr1, 20)
        data = _batch(args.seed, 1, step, args.batch)
        cover = torch.from_numpy(np.stack([data.patch_coverage(i) for i in range(len(data))]))  # (B, K, G, G)
        images = data.to_tensor(data.images())  # rendered by patch_coverage already
        labels = torch.from_numpy(data.labels.astype(np.float32))
        x = visual._embeds(images)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        logits = head(pooled)
        # Classes are weighted up: the condition factors (global image statistics) are learned first otherwise,
        # and the object classes, which need shape and colour, lag far behind.
        loss = args.class_weight * F.binary_cross_entropy_with_logits(logits[:, :num_cls], labels)
        offset = num_cls
        for f, n in enumerate(sizes):
            loss = loss + F.cross_entropy(logits[:, offset : offset + n], torch.from_numpy(data.conditions[:, f]))
            offset += n
        dense_logits = head(tokens, slice(0, num_cls))  # (B, M, K)
        dense_target = (cover.flatten(2).transpose(1, 2) > 0.25).float()
        loss = loss + args.class_weight * F.binary_cross_entropy_with_logits(dense_logits, dense_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.stage1_steps - 1:
            with torch.no_grad():
                batch_map = float(
                    average_precision_score(data.labels, logits[:, :num_cls].float().numpy(), average="macro")
                )
            log.append({"stage": 1, "step": step, "loss": float(loss.detach()), "batch_class_mAP": batch_map})
            print(f"stage 1 step {step:4d} loss {float(loss.detach()):.4f} batch class mAP {batch_map:.3f}", flush=True)

    visual.eval()
    return head


def train_text_tower(
    model: torch.nn.Module,
    tokenizer,
    args: argparse.Namespace,
    log: list[dict],
    used: set[int],
    head: CosineHead | None,
) -> None:
    """Stage 2: LiT alignment of the text tower to the frozen image tower with a multi-positive sigmoid loss."""
    for p in model.visual.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    opt = torch.optim.AdamW(params, lr=args.lr2, weight_decay=0.01)
    rng = np.random.default_rng([args.seed, 2])
    for step in range(args.stage2_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.stage2_steps, args.lr2, 30)
        data = _batch(args.seed, 2, step, args.batch)
        with torch.no_grad():
            img = F.normalize(model.encode_image(data.to_tensor(data.images())), dim=-1)
        caps = [caption(s, rng) for s in data.scenes]
        if args.concept_bank:
            caps += concept_bank(rng)
        facts = [scene_facts(s) for s in data.scenes]
        match = torch.tensor([[c.claims <= f for c in caps] for f in facts], dtype=torch.float32)  # (img, txt)
        tokens = tokenizer([c.text for c in caps])
        used.update(int(t) for t in tokens.unique())
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
        signs = 2 * match - 1
        weights = torch.ones(len(caps))
        weights[len(data) :] = args.bank_weight
        loss = -(F.logsigmoid(signs * logits) * weights).sum() / len(caps)
        if head is not None and args.concept_bank and args.distill_weight > 0:
            # The bank's captions are in the head's row order: pull each towards its concept's head direction.
            targets = F.normalize(head.weight.detach(), dim=-1)
            loss = loss + args.distill_weight * (1 - (txt[len(data) :] * targets).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.stage2_steps - 1:
            log.append({"stage": 2, "step": step, "loss": float(loss.detach()), "positives": float(match.sum())})
            per_row = float(match.sum()) / len(caps)
            print(f"stage 2 step {step:4d} loss {float(loss.detach()):.4f} positives/row {per_row:.2f}")


CLASS_TEMPLATES = (
    "a photo of {a} {c}.",
    "a picture with {a} {c}.",
    "an image containing {a} {c}.",
    "there is {a} {c}.",
    "{a} {c}.",
)


def concept_bank(rng: np.random.Generator) -> list[Caption]:
    """One short caption per concept of the pretraining world, added to every stage-2 batch.

    Every class ("a picture with a star.", wording drawn from ``CLASS_TEMPLATES``) and every value of every
    condition factor (one of its phrasings) appears in each batch, so that the sigmoid loss sees each concept
    against all 128 images of the batch, not only in the ~10% of captions that are short forms. The match matrix
    is still computed from claims, so a concept matches every image where it holds.
    """
    bank: list[Caption] = []
    for c in ALL_CLASSES:
        template = CLASS_TEMPLATES[int(rng.integers(len(CLASS_TEMPLATES)))]
        bank.append(Caption(template.format(a="an" if c[0] in "aeiou" else "a", c=c), frozenset({("class", c)})))
    for factor in CONDITION_FACTORS:
        for value, phrases in zip(factor.values, factor.phrases, strict=True):
            phrase = phrases[int(rng.integers(len(phrases)))]
            text = condition_sentence(factor, phrase)
            bank.append(Caption(text, frozenset({("condition", factor.name, value)})))
    return bank


@torch.no_grad()
def zero_shot_report(backbone: Backbone, world_seed: int = 0, n: int = 1000) -> dict[str, float]:
    """Zero-shot mAP (percent) of "a photo of a {class}." on the default benchmark's test splits, and condition
    accuracy (percent) of "a photo with ..." prompts for each condition factor on the decorrelated split."""
    world = make_federated_world(FederatedWorldConfig(seed=world_seed, global_test_size=n))
    report: dict[str, float] = {}
    for split, data in (
        ("decorrelated", world.test_decorrelated),
        ("in_distribution", world.test_in_distribution),
    ):
        img = F.normalize(backbone.model.encode_image(data.to_tensor(data.images())), dim=-1)
        txt = F.normalize(backbone.encode_text(backbone.tokenize([class_prompt(c) for c in data.classnames])), dim=-1)
        scores = (img @ txt.T).numpy()
        report[f"zero_shot_mAP_{split}"] = 100 * float(average_precision_score(data.labels, scores, average="macro"))
        if split == "decorrelated":
            for f, factor in enumerate(CONDITION_FACTORS):
                prompts = backbone.tokenize(condition_prompts(f))
                cond = F.normalize(backbone.encode_text(prompts), dim=-1)
                pred = (img @ cond.T).argmax(dim=1).numpy()
                report[f"condition_acc_{factor.name.replace(' ', '_')}"] = 100 * float(
                    (pred == data.conditions[:, f]).mean()
                )
                report[f"condition_chance_{factor.name.replace(' ', '_')}"] = 100 / len(factor.values)
    return report


@torch.no_grad()
def linear_probe_report(backbone: Backbone, seed: int = 0, n_train: int = 3000, world_seed: int = 0) -> float:
    """mAP (percent) on the decorrelated split of per-class logistic regressions fitted on the image embeddings
    of ``n_train`` pretraining-world images: how much class information the image tower holds, against which
    the zero-shot mAP shows how much of it the text tower can name."""
    from sklearn.linear_model import LogisticRegression

    test = make_federated_world(FederatedWorldConfig(seed=world_seed, global_test_size=1000)).test_decorrelated
    train = WorldDataset(pretraining_distribution(), n_train, seed=seed, stream=(99, 0), split="pretrain")
    encode = backbone.model.encode_image
    x_train = F.normalize(encode(train.to_tensor(train.images())), dim=-1).numpy()
    x_test = F.normalize(encode(test.to_tensor(test.images())), dim=-1).numpy()
    columns = [list(train.classnames).index(c) for c in test.classnames]
    scores = np.stack(
        [
            LogisticRegression(C=10, max_iter=2000).fit(x_train, train.labels[:, c]).decision_function(x_test)
            for c in columns
        ],
        axis=1,
    )
    return 100 * float(average_precision_score(test.labels, scores, average="macro"))


def world_vocabulary_ids(tokenizer) -> set[int]:
    """Token ids of every word the world and the shipped prompts use."""
    words = list(ALL_CLASSES) + list(COLOURS) + [EXTRA_VOCABULARY]
    for factor in CONDITION_FACTORS:
        words.append(factor.name)
        words.extend(p for phrases in factor.phrases for p in phrases)
        words.extend(factor.values)
    words.extend(class_prompt(c) for c in ALL_CLASSES)
    for f in range(len(CONDITION_FACTORS)):
        words.extend(condition_prompts(f))
    ids: set[int] = set()
    for w in words:
        ids.update(int(t) for t in tokenizer([w]).unique())
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stage1-steps", type=int, default=1000)
    parser.add_argument("--stage2-steps", type=int, default=500)
    parser.add_argument("--lr1", type=float, default=2e-3)
    parser.add_argument("--class-weight", type=float, default=5.0)
    parser.add_argument("--lr2", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report", type=Path, default=REPO / "experiments" / "results" / "tiny_clip_pretrain.json")
    parser.add_argument("--eval-only", action="store_true", help="only report zero-shot numbers of --out")
    parser.add_argument(
        "--no-concept-bank",
        dest="concept_bank",
        action="store_false",
        help="stage 2 without the per-batch bank of short class and condition captions",
    )
    parser.add_argument("--bank-weight", type=float, default=20.0, help="loss weight of the concept-bank captions")
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=10.0,
        help="weight of pulling each concept caption's embedding towards its stage-1 head direction",
    )
    parser.add_argument(
        "--stage1-state",
        type=Path,
        default=None,
        help="development only: load the stage-1 image tower and head from this file if it exists and skip "
        "stage 1, else save them there after stage 1",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_model_configs()

    if args.eval_only:
        shipped = load_backbone(TINY_CLIP, checkpoint=args.out)
        trained = zero_shot_report(shipped)
        trained["linear_probe_mAP_decorrelated"] = linear_probe_report(shipped)
        torch.manual_seed(args.seed)
        random = zero_shot_report(load_backbone(TINY_CLIP, random_init=True))
        print(json.dumps({"trained": trained, "random_init": random}, indent=2))
        return

    torch.manual_seed(args.seed)
    model = open_clip.create_model(TINY_CLIP)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    log: list[dict] = []
    start = time.perf_counter()
    head = CosineHead(model.text_projection.shape[1], len(concept_bank(np.random.default_rng(0))))
    if args.stage1_state is not None and args.stage1_state.exists():
        state = torch.load(args.stage1_state, weights_only=True)
        model.visual.load_state_dict(state["visual"])
        head.load_state_dict(state["head"])
        model.visual.eval()
    else:
        head = train_image_tower(model, args, log)
        if args.stage1_state is not None:
            torch.save({"visual": model.visual.state_dict(), "head": head.state_dict()}, args.stage1_state)
    t1 = time.perf_counter() - start
    used = world_vocabulary_ids(tokenizer)
    train_text_tower(model, tokenizer, args, log, used, head)
    elapsed = time.perf_counter() - start
    model.eval()
    save_tiny_clip(
        model,
        args.out,
        sorted(used),
        {
            "seed": str(args.seed),
            "recipe": "lit-siglip-multipositive/1",
            "args": json.dumps(vars(args), default=str),
        },
    )
    shipped = load_backbone(TINY_CLIP, checkpoint=args.out)
    trained = zero_shot_report(shipped)
    trained["linear_probe_mAP_decorrelated"] = linear_probe_report(shipped)
    torch.manual_seed(args.seed)
    random = zero_shot_report(load_backbone(TINY_CLIP, random_init=True))
    result = {
        "seed": args.seed,
        "threads": args.threads,
        "stage1_seconds": t1,
        "pretrain_seconds": elapsed,
        "checkpoint_bytes": args.out.stat().st_size,
        "token_rows_kept": len(used),
        "trained": trained,
        "random_init": random,
        "log": log,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
