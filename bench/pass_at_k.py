"""Diagnostic: how often does a model already draw a strictly correct image, per task and category?

    python bench/pass_at_k.py [--model models/miniworld] [--tasks compose,text] [--k 8] [--steps 8]

For every held-out prompt of a task, ``k`` SDE samples as a Flow-GRPO rollout draws them (``--steps``, CFG 4.5,
noise level 0.7, one seed per sample), scored by the task's strict reward (compose: the detector's all-or-
nothing correctness; text: the word read exactly). Per category it prints pass@1 (the mean strict score: the
chance one sample is right) and pass@k (the share of prompts with at least one right sample among k).

GRPO can only make likelier what some sample of a group already does: a category whose pass@k is near 0 gives
a group nothing to reinforce (issue 20), while one with pass@k well above pass@1 is one RL can move.
"""

from __future__ import annotations

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy


def main() -> None:
    parser = diagnostic_parser(__doc__)
    parser.add_argument("--tasks", default="compose,text", help="comma-separated tasks with a strict reward")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt (Flow-GRPO's group)")
    parser.add_argument("--steps", type=int, default=8, help="SDE steps (the main job's rollouts: 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from flowopd_core.miniworld.sets import prompt_set
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.rewards import TASK_REWARDS, make_reward
    from flowopd_core.sampling.generate import SampleConfig, generate

    pipe = load_pipeline(args.model)
    config = SampleConfig(steps=args.steps, guidance_scale=4.5, kind="sde", noise_level=0.7, batch_size=64,
                          seed=args.seed)
    print(f"{args.model}: {args.k} SDE samples per held-out prompt, {args.steps} steps, CFG 4.5, noise 0.7\n")
    print(f"| task | category | prompts | pass@1 | pass@{args.k} |\n|---|---|---|---|---|")
    for task in args.tasks.split(","):
        prompts = prompt_set(task, "test")
        reward = make_reward(TASK_REWARDS[task])
        specs = [p for p in prompts for _ in range(args.k)]
        images = generate(pipe, [p.text for p in specs], config, keep_latents=False).images
        strict = torch.cat([reward(images[i:i + 64], specs[i:i + 64]).strict for i in range(0, len(specs), 64)])
        strict = strict.view(len(prompts), args.k)
        by_category: dict[str, list[int]] = {}
        for row, prompt in enumerate(prompts):
            by_category.setdefault(prompt.category or "-", []).append(row)
        for category, rows in by_category.items():
            part = strict[rows]
            pass1 = float(part.nanmean())
            pass_k = float((part.nan_to_num(0.0) > 0).any(1).float().mean())
            print(f"| {task} | {category} | {len(rows)} | {pass1:.2f} | {pass_k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
