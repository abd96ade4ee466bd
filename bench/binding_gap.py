"""Diagnostic: does a model's velocity depend on which shape goes with which colour (the binding)?

    python bench/binding_gap.py --models models/miniworld [other pipeline folders] [--images 192] [--split train]

Draws ``--images`` two-object compose images (``pair`` and ``position`` prompts of ``--split`` naming two colours
and two shapes; the placement drawn as the pretraining data draws it) and scores each model's rectified-flow loss
(docs/method.md §3) at fixed times t with the true prompt and with its binding-swapped twin (the two shape words
exchanged: "a red circle and a blue square" -> "a red square and a blue circle", taken from the prompt set), the
same noise for every model and prompt. A model that binds predicts the true image better from the true prompt: the
gap (twin - true) is positive. Printed per t: the loss with the true prompt, the gap over the whole image and over
the binding pixels only (``binding_pixels``: where the twin's image differs), each with its 95 % interval over
images, and, for scale, the gap to an unrelated prompt of the same set. The rows of several models are side by side
(the same images, noise and times).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the runner: idle threads sleep beside other work


def twins(specs: list) -> list[str]:
    """The prompt of each two-object compose spec's binding-swapped twin (the same template, relation and colours,
    the two shapes exchanged), looked up among all compose prompts of both splits, where every twin exists."""
    from flowopd_core.miniworld import prompts

    def key(spec, swap: bool) -> tuple:
        (c0, s0), (c1, s1) = ((o["colour"], o["shape"]) for o in spec.spec["objects"])
        return spec.spec["template"], spec.spec.get("relation"), ((c0, s1), (c1, s0)) if swap else ((c0, s0), (c1, s1))

    texts = {key(p, False): p.text for split in ("train", "test") for p in prompts("compose", split)
             if len(p.spec["objects"]) == 2}
    return [texts[key(s, True)] for s in specs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "models" / "miniworld")], help="pipeline folders")
    parser.add_argument("--images", type=int, default=192, help="two-object images drawn")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="which prompts")
    parser.add_argument("--times", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="noise levels t")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images < 2 or not all(0 < t < 1 for t in args.times):
        parser.error("--images must be >= 2 and every --times value in (0, 1)")

    import torch

    from flowopd_core.miniworld import template_prompts
    from flowopd_core.miniworld.rendering import binding_pixels, draw_objects, from_uint8, placed_objects
    from flowopd_core.models.pipeline import TextEmbeddingCache, encode_images, load_pipeline, velocity

    pool = [s for template in ("pair", "position") for s in template_prompts("compose", template, args.split)
            if len({o["colour"] for o in s.spec["objects"]}) == 2 and len({o["shape"] for o in s.spec["objects"]}) == 2]
    rng = np.random.default_rng(args.seed)
    specs = [pool[i] for i in rng.integers(len(pool), size=args.images)]
    placed = [placed_objects(s, rng) for s in specs]
    images = from_uint8([draw_objects(p, 32) for p in placed])
    masks = torch.from_numpy(np.stack([binding_pixels(p, s.spec["objects"]) for p, s in zip(placed, specs)]))
    prompts = {"true": [s.text for s in specs], "twin": twins(specs),
               "other": [specs[(i + 1) % len(specs)].text for i in range(len(specs))]}
    generator = torch.Generator().manual_seed(args.seed)
    noise = {t: torch.randn(images.shape, generator=generator) for t in args.times}
    print(f"{args.images} two-object {args.split} images ({len(pool)} prompts), binding pixels "
          f"{masks.float().mean():.3f} of each image; gaps = loss(prompt) - loss(true), 95 % interval over images\n")
    print("| model | t | loss (true) | gap: twin, whole image | gap: twin, binding pixels | gap: other prompt |\n"
          "|---|---|---|---|---|---|")
    n = len(specs)
    for folder in args.models:
        pipe = load_pipeline(folder)
        cache = TextEmbeddingCache(pipe)
        x0 = encode_images(pipe, images).float()
        if x0.shape[-2:] != images.shape[-2:]:
            raise SystemExit(f"{folder}: a latent-space model; the binding pixels need a pixel-space one")
        for t in args.times:
            eps = noise[t]
            x_t = (1 - t) * x0 + t * eps
            errors = {}
            with torch.no_grad():
                for name, texts in prompts.items():
                    v = velocity(pipe.transformer, x_t, torch.full((n,), t), cache.encode(texts))
                    errors[name] = ((v - (eps - x0)) ** 2).mean(dim=1)  # (N, H, W)
            whole = {k: e.flatten(1).mean(1) for k, e in errors.items()}
            bound = {k: (e * masks).flatten(1).sum(1) / masks.flatten(1).sum(1) for k, e in errors.items()}

            def gap(d: torch.Tensor) -> str:
                return f"{d.mean():+.5f} ± {1.96 * d.std() / n ** 0.5:.5f}"

            print(f"| {folder} | {t:g} | {whole['true'].mean():.4f} | "
                  f"{gap(whole['twin'] - whole['true'])} | {gap(bound['twin'] - bound['true'])} | "
                  f"{gap(whole['other'] - whole['true'])} |", flush=True)


if __name__ == "__main__":
    main()
