"""Diagnostic: which compose constraints does a model fail, on held-out and on training prompts?

    python bench/compose_failures.py [--model models/miniworld] [--adapter DIR] [--k 4] [--train-prompts 288]
        [--sampler sde] [--cfg 4.5] [--steps N] [--splits test train]

For every held-out compose prompt and a seeded sample of training prompts, ``k`` SDE samples as a Flow-GRPO
rollout draws them (8 steps, CFG 4.5, noise level 0.7; ``--sampler ode``: ODE samples as the Evaluator draws them,
16 steps, CFG 4.5), judged by the compose detector. Per category it prints
the strict accuracy and how often each constraint fails (``object0_shape``, ``relation``, ...). A constraint that
fails as often on training prompts as on held-out ones, at the rate of a blind guess (a relation holds by chance
for about 1 layout in 4), is one the model never learned, not one that fails to generalise (issue 20).
In two-object samples whose named shapes differ, the last column splits the objects that fail their shape by
what their colour got: the other object's shape (``swapped``: a binding error), a third shape, or no object of
that colour. ``touching``: the share of samples with a detected object whose box reaches the image's edge (a
cropped object, the error ``compose_crop_fraction`` installs), and the strict accuracy of those samples against
the others (does the compose reward see the crop?). ``miscounts``: of the named objects drawn in their shape but
in the wrong number, the share with too few and too many copies. ``--adapter``: sample with a LoRA adapter saved
on that base (e.g. a teacher from ``bench/compose_probe.py --save``).
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy


def main() -> None:
    parser = diagnostic_parser(__doc__, "pipeline folder")
    parser.add_argument("--adapter", help="a LoRA adapter folder (peft, safetensors) trained on --model")
    parser.add_argument("--k", type=int, default=4, help="SDE samples per prompt")
    parser.add_argument("--train-prompts", type=int, default=288, help="training prompts sampled (seed 0)")
    parser.add_argument("--sampler", choices=("sde", "ode"), default="sde",
                        help="sde: as a GRPO rollout (8 steps, noise 0.7); ode: as the Evaluator (16 steps)")
    parser.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps (0: 8 for sde, 16 for ode)")
    parser.add_argument("--splits", nargs="+", choices=("test", "train"), default=["test", "train"],
                        help="which prompt splits to sample")
    args = parser.parse_args()
    if args.steps < 0 or args.k < 1:
        parser.error("--steps must be >= 0 and --k >= 1")
    if args.adapter and not (Path(args.adapter) / "adapter_model.safetensors").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_model.safetensors there")

    from flowopd_core.miniworld.sets import prompt_set
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.models.policy import Policy
    from flowopd_core.rewards import make_reward
    from flowopd_core.rewards.base import images_to_uint8
    from flowopd_core.rewards.compose import detect_objects, judge
    from flowopd_core.sampling.generate import SampleConfig, generate

    pipe = load_pipeline(args.model)
    transformer = None  # the pipeline's own, or the LoRA-wrapped one with the adapter under test
    if args.adapter:
        policy = Policy(pipe.transformer)
        policy.load_adapter("probed", args.adapter)
        transformer = policy.model
    sde = args.sampler == "sde"
    steps = args.steps or (8 if sde else 16)
    config = SampleConfig(steps=steps, guidance_scale=args.cfg, kind=args.sampler, noise_level=0.7,
                          batch_size=64, seed=0)
    reward = make_reward("compose")
    drawn = (f"SDE samples per prompt, {steps} steps, CFG {args.cfg:g}, noise 0.7" if sde
             else f"ODE samples per prompt, {steps} steps, CFG {args.cfg:g}")
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''}: {args.k} {drawn}; share of samples failing "
          "each constraint\n")
    print("| split | category | samples | strict | failed constraints | failed shapes in two-object samples: swapped / "
          "a third shape / colour absent (of the objects) | touching: share (strict when touching / not) | "
          "miscounts: too few / too many |\n|---|---|---|---|---|---|---|---|")
    for split in args.splits:
        prompts = list(prompt_set("compose", split))
        if split == "train":
            prompts = random.Random(0).sample(prompts, min(args.train_prompts, len(prompts)))
        specs = [p for p in prompts for _ in range(args.k)]
        images = generate(pipe, [p.text for p in specs], config, keep_latents=False, transformer=transformer,
                          adapter_names=["probed"] * len(specs) if args.adapter else None).images
        failed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        count, strict = collections.Counter(), collections.Counter()
        misses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        touch: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for start in range(0, len(specs), 64):
            batch = specs[start:start + 64]
            pixels = images_to_uint8(images[start:start + 64])
            for spec, image in zip(batch, pixels):
                detections = detect_objects(image, reward.config)  # once: the score and the frame test both read them
                score = judge(detections, spec.spec)  # the compose reward's verdict (ComposeReward.score_one)
                count[spec.category] += 1
                strict[spec.category] += score.strict
                failed[spec.category].update(name for name, ok in score.details["constraints"].items() if not ok)
                misses[spec.category].update(shape_misses(spec.spec, score.details))
                misses[spec.category].update(miscounts(spec.spec, detections))
                edge = "touching" if touches_frame(detections, image.shape[:2]) else "inside"
                touch[spec.category].update({edge: 1, f"{edge} strict": score.strict})
        for category in sorted(count, key=list(count).index):
            n = count[category]
            shares = ", ".join(f"{name} {failed[category][name] / n:.2f}" for name in sorted(failed[category]))
            m = misses[category]
            binding = (f"{m['swapped'] / m['objects']:.2f} / {m['third'] / m['objects']:.2f} / "
                       f"{m['absent'] / m['objects']:.2f} (of {m['objects']})" if m["objects"] else "")
            t = touch[category]
            edges = f"{t['touching'] / n:.2f} ({share(t, 'touching')} / {share(t, 'inside')})"
            wrong = m["too few"] + m["too many"]
            counts = f"{m['too few'] / wrong:.2f} / {m['too many'] / wrong:.2f} (of {wrong})" if wrong else ""
            print(f"| {split} | {category} | {n} | {strict[category] / n:.2f} | {shares} | {binding} | {edges} | "
                  f"{counts} |", flush=True)


def share(counts: collections.Counter, key: str) -> str:
    """Mean strict score of the samples counted under ``key`` ("-" if none)."""
    return f"{counts[key + ' strict'] / counts[key]:.2f}" if counts[key] else "-"


def touches_frame(detections: list, shape: tuple[int, int]) -> bool:
    """Does any detection's box ``(y0, x0, y1, x1)`` (half-open) reach the edge of an image of ``shape`` (H, W)?"""
    height, width = shape
    return any(y0 == 0 or x0 == 0 or y1 == height or x1 == width for y0, x0, y1, x1 in (d.bbox for d in detections))


def shape_misses(spec: dict, details: dict) -> list[str]:
    """For a two-object spec whose shapes differ: ``"objects"`` per named object, plus per object that fails its
    shape what the largest detection of its colour is: ``"swapped"`` (the other object's shape), ``"third"``
    (another shape) or ``"absent"`` (no object of that colour). Other specs: ``[]``."""
    objects = spec.get("objects", [])
    if len(objects) != 2 or objects[0]["shape"] == objects[1]["shape"]:
        return []
    out = []
    for k, obj in enumerate(objects):
        out.append("objects")
        if details["constraints"][f"object{k}_shape"]:
            continue
        got = [d.split()[2] for d in details["detected"] if d.split()[1] == obj["colour"]]  # largest first
        out.append("absent" if not got else "swapped" if got[0] == objects[1 - k]["shape"] else "third")
    return out


def miscounts(spec: dict, detections: list) -> list[str]:
    """Per named object drawn in its colour and shape but not ``count`` times (the compose judge's count rule):
    ``"too few"`` or ``"too many"``."""
    out = []
    for obj in spec.get("objects", []):
        drawn = sum(d.colour == obj["colour"] and d.shape == obj["shape"] for d in detections)
        if drawn and drawn != obj["count"]:
            out.append("too few" if drawn < obj["count"] else "too many")
    return out


if __name__ == "__main__":
    main()
