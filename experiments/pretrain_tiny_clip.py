"""Pretrain the bundled tiny CLIP (``fedmpt-tiny-clip``) on the broader synthetic world, reproducibly from a seed.

Recipe (LiT-style, two stages; the pretraining world has all 16 glyph classes, object colours and every
condition drawn independently and uniformly, so no client's spurious pairing is ever taught):

1. **Image tower, supervised.** The open_clip ViT is trained from scratch with a linear concept head on its
   pooled embedding: multi-label BCE over the 16 classes, one cross-entropy per condition factor (layout, pose,
   background, lighting, scale), and a dense term: every projected patch token, read by the same class head,
   predicts which classes cover that patch. The dense term makes patch features meaningful in the joint space,
   which the region-level parts of FedMPT (adapters, optimal transport) and DualCoOp rely on.
2. **Text tower, aligned.** The image tower is frozen and the text tower (with the logit scale and bias) is
   trained with the sigmoid loss of SigLIP. open_clip's ``SigLipLoss`` assumes exactly one positive per row
   (the diagonal); our captions are sometimes short forms ("a photo of a star.") that are true of several images
   in a batch, so we use the same pairwise sigmoid loss with the true match matrix: caption j matches image i
   when every fact it claims holds in image i.

The checkpoint keeps only the token-embedding rows of the BPE tokens the world uses (fp16 storage), so it is a
few MB. Usage (about 10-15 minutes on 2 cores)::

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
from fedmpt.world.captions import caption, class_prompt, condition_prompts, scene_facts
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
    return WorldDataset(
        pretraining_distribution(), size, seed=seed, stream=(10 + stage, step), split="pretrain"
    )


def train_image_tower(model: torch.nn.Module, args: argparse.Namespace, log: list[dict]) -> None:
    """Stage 1: supervised concept head (classes, condition factors, dense patch classes) on the ViT."""
    visual = model.visual
    num_cls = len(ALL_CLASSES)
    sizes = [len(f.values) for f in CONDITION_FACTORS]
    head = torch.nn.Linear(model.text_projection.shape[1], num_cls + sum(sizes))
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
            loss = loss + F.cross_entropy(
                logits[:, offset : offset + n], torch.from_numpy(data.conditions[:, f])
            )
            offset += n
        dense_logits = tokens @ head.weight[:num_cls].T + head.bias[:num_cls]  # (B, M, K)
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


def train_text_tower(
    model: torch.nn.Module, tokenizer, args: argparse.Namespace, log: list[dict], used: set[int]
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
        facts = [scene_facts(s) for s in data.scenes]
        match = torch.tensor(
            [[c.claims <= f for c in caps] for f in facts], dtype=torch.float32
        )  # (img, txt)
        tokens = tokenizer([c.text for c in caps])
        used.update(int(t) for t in tokens.unique())
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
        signs = 2 * match - 1
        loss = -F.logsigmoid(signs * logits).sum() / len(caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.stage2_steps - 1:
            log.append({"stage": 2, "step": step, "loss": float(loss), "positives": float(match.sum())})
            print(
                f"stage 2 step {step:4d} loss {float(loss):.4f} positives/row {float(match.sum()) / len(caps):.2f}"
            )


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
        txt = F.normalize(
            backbone.encode_text(backbone.tokenize([class_prompt(c) for c in data.classnames])), dim=-1
        )
        scores = (img @ txt.T).numpy()
        report[f"zero_shot_mAP_{split}"] = 100 * float(
            average_precision_score(data.labels, scores, average="macro")
        )
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--lr1", type=float, default=2e-3)
    parser.add_argument("--class-weight", type=float, default=5.0)
    parser.add_argument("--lr2", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--report", type=Path, default=REPO / "experiments" / "results" / "tiny_clip_pretrain.json"
    )
    parser.add_argument("--eval-only", action="store_true", help="only report zero-shot numbers of --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_model_configs()

    if args.eval_only:
        trained = zero_shot_report(load_backbone(TINY_CLIP, checkpoint=args.out))
        random = zero_shot_report(load_backbone(TINY_CLIP, random_init=True))
        print(json.dumps({"trained": trained, "random_init": random}, indent=2))
        return

    torch.manual_seed(args.seed)
    model = open_clip.create_model(TINY_CLIP)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    log: list[dict] = []
    start = time.perf_counter()
    train_image_tower(model, args, log)
    t1 = time.perf_counter() - start
    used = world_vocabulary_ids(tokenizer)
    train_text_tower(model, tokenizer, args, log, used)
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
    trained = zero_shot_report(load_backbone(TINY_CLIP, checkpoint=args.out))
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
