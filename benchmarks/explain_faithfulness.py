"""Are the explanation maps faithful? A pointing game and a deletion test on synthetic data whose answers depend
on one known region.

``python benchmarks/explain_faithfulness.py [--steps 400] [--seed 0]``

Each image holds one lesion (``data/synthetic.py``'s shapes, regions and intensities; the generator knows its
box, :func:`region_box`); the questions are "what shape is the lesion?" (circle / square / triangle) and "is the
lesion bright?" (yes / no), so every answer depends on the lesion's pixels only. A ``tiny``-preset backbone with a
classifier head is trained from scratch on the CPU, then on held-out images:

* **pointing game**: the map's highest patch lies inside the lesion's box, per method, against a uniformly random
  patch (its exact expectation: the share of patches whose centre is in the box) and a random pick among the
  five possible lesion places;
* **deletion**: the ``k`` highest patches of the map are painted with the image's background value; how often the
  answer changes, against ``k`` random patches (mean of 5 draws). Only correctly answered images count.

Prints the figures; nothing is written. Took 405 s on 2 busy CPU cores with the defaults (400 steps).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from umd_lightning.data.synthetic import REGIONS, random_scene, region_box, render
from umd_lightning.data.transforms import image_transform
from umd_lightning.explain import METHODS, patch_maps
from umd_lightning.models import ClassifierHead, UMDBackbone, load_tokenizer, preset, resolve_text_model

LABELS = ["circle", "square", "triangle", "yes", "no"]
QUESTIONS = ("what shape is the lesion?", "is the lesion bright?")


def make_set(n: int, size: int, rng: np.random.Generator, transform) -> dict[str, torch.Tensor | list]:
    """``n`` one-lesion images, each asked both questions: pixels, question index, answer index, lesion box."""
    pixels, boxes, answers, question_ids = [], [], [], []
    for _ in range(n):
        scene = random_scene(rng, min_lesions=1, max_lesions=1)
        lesion = scene.lesions[0]
        image = transform(Image.fromarray(np.asarray(render(scene, size, rng))).convert("RGB"))
        for q, answer in enumerate((lesion.shape, "yes" if lesion.intensity == "bright" else "no")):
            pixels.append(image)
            boxes.append(region_box(lesion.region, size))
            answers.append(LABELS.index(answer))
            question_ids.append(q)
    return {
        "pixels": torch.stack(pixels),
        "answers": torch.tensor(answers),
        "questions": torch.tensor(question_ids),
        "boxes": boxes,
    }


def inside(boxes: list[tuple[int, int, int, int]], grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, N) bool: patch centre inside the sample's box."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = (rows.flatten() + 0.5) * patch, (cols.flatten() + 0.5) * patch
    return torch.stack([(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1) for x0, y0, x1, y1 in boxes])


def paint(pixels: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Copy of ``pixels`` (B, 3, H, W) with the patches ``patches`` (B, k) set to each image's median value."""
    out = pixels.clone()
    background = pixels.flatten(2).median(dim=2).values  # (B, 3): the dark body / outside
    for i in range(pixels.shape[0]):
        for index in patches[i].tolist():
            r, c = divmod(index, grid[1])
            out[i, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = background[i][:, None, None]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps (batch 32)")
    parser.add_argument("--train", type=int, default=1200, help="training images")
    parser.add_argument("--test", type=int, default=200, help="held-out images")
    parser.add_argument("--size", type=int, default=64, help="image side (8 px patches)")
    parser.add_argument("--k", type=int, default=4, help="patches deleted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    cfg = preset("tiny", {"image_size": args.size})
    backbone, head = UMDBackbone(cfg), ClassifierHead(2 * cfg.fusion.width, len(LABELS))
    tokenizer = load_tokenizer(resolve_text_model(cfg.text.name_or_path))
    tokens = tokenizer(list(QUESTIONS), padding=True, return_tensors="pt")
    transform = image_transform(args.size, train=False)
    train, test = make_set(args.train, args.size, rng, transform), make_set(args.test, args.size, rng, transform)
    patch = cfg.vision.patch_size
    grid = backbone.vision.grid_size(args.size)

    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    backbone.train()
    head.train()
    for step in range(args.steps):
        index = torch.randint(len(train["answers"]), (32,))
        q = train["questions"][index]
        logits = head(backbone(train["pixels"][index], tokens["input_ids"][q], tokens["attention_mask"][q]).pooled)
        loss = F.cross_entropy(logits, train["answers"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    backbone.eval()
    head.eval()
    trained = time.time() - started

    q = test["questions"]
    ids, mask = tokens["input_ids"][q], tokens["attention_mask"][q]
    logits, maps = patch_maps(backbone, head, test["pixels"], ids, mask)
    predicted = logits.argmax(-1)
    correct = predicted == test["answers"]
    hits = inside(test["boxes"], grid, patch)
    print(f"\ntrained {args.steps} steps in {trained:.0f} s; held-out accuracy {correct.float().mean():.1%}")
    print(f"  (shape {correct[q == 0].float().mean():.1%}, brightness {correct[q == 1].float().mean():.1%})")

    uniform = hits.float().mean(1).mean()
    centres = torch.tensor(
        [[(r[0] + r[2]) / 2, (r[1] + r[3]) / 2] for r in (region_box(x, args.size) for x in REGIONS)]
    )
    cells = (centres // patch).long()
    centre_patches = cells[:, 1] * grid[1] + cells[:, 0]
    region_pick = hits[:, centre_patches].float().mean(1).mean()
    print(f"\npointing game on {len(q)} held-out questions (map maximum inside the lesion's box):")
    print(f"  random patch (expected)          {uniform:6.1%}")
    print(f"  random one of the 5 lesion places {region_pick:6.1%}")
    for method in METHODS:
        top = maps[method].flatten(1).argmax(1)
        accuracy = hits[torch.arange(len(top)), top].float().mean()
        print(f"  {method:<32} {accuracy:6.1%}")

    chosen = correct.nonzero().flatten()
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"\ndeletion of the top {args.k} of {grid[0] * grid[1]} patches on {len(chosen)} correctly answered questions"
    )
    print("(answer changed):")
    pixels, c_ids, c_mask = test["pixels"][chosen], ids[chosen], mask[chosen]
    with torch.no_grad():
        changes = []
        for _ in range(5):
            random_patches = torch.stack(
                [torch.randperm(grid[0] * grid[1], generator=generator)[: args.k] for _ in chosen]
            )
            out = head(backbone(paint(pixels, random_patches, grid, patch), c_ids, c_mask).pooled).argmax(-1)
            changes.append((out != predicted[chosen]).float().mean())
        print(f"  random {args.k} patches (mean of 5)     {torch.stack(changes).mean():6.1%}")
        for method in METHODS:
            top_patches = maps[method][chosen].flatten(1).topk(args.k, dim=1).indices
            out = head(backbone(paint(pixels, top_patches, grid, patch), c_ids, c_mask).pooled).argmax(-1)
            print(f"  {method:<32} {(out != predicted[chosen]).float().mean():6.1%}")
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
