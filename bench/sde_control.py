"""Diagnostic: how much of a reward's spread within a GRPO group do the SDE steps (the policy's actions) control?

    python bench/sde_control.py [--model models/miniworld] [--prompts 24] [--group 8] [--noise-level 0.7]

GRPO credits the log-probs of the SDE transitions, not the initial noise x_T. For seeded training prompts of
each task (compose per category, text, quality) it draws groups as a Flow-GRPO rollout does (8 steps, CFG 4.5),
twice: each sample with its own x_T, and each group sharing one x_T (then only the SDE step noise differs).
Per reward (and, for compose, per constraint: a relation holds, the shapes are right) it prints the mean
within-group variance of both and their ratio: the share of the spread the actions control. A ratio near 0
means the outcome is fixed by x_T, which no policy-gradient step can credit (issue 20's question for relations).
"""

from __future__ import annotations

import random

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy

CASES = (("compose", "single"), ("compose", "pair"), ("compose", "position"), ("text", None), ("quality", None))


def main() -> None:
    parser = diagnostic_parser(__doc__, "pipeline folder")
    parser.add_argument("--prompts", type=int, default=24, help="training prompts per case (seed 0)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a")
    args = parser.parse_args()

    import numpy as np
    import torch

    from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
    from flowopd_core.miniworld import tasks
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.models.policy import Policy
    from flowopd_core.prompts import PromptSet
    from flowopd_core.rewards import TASK_REWARDS, make_reward
    from flowopd_core.rewards.base import images_to_uint8

    pipe = load_pipeline(args.model)
    policy = Policy(pipe.transformer)
    print(f"{args.model}: {args.prompts} training prompts x {args.group} SDE samples (8 steps, CFG 4.5, noise "
          f"{args.noise_level}); mean within-group variance with an x_T per sample / one x_T per group\n")
    print("| task | category | outcome | mean | var, own x_T | var, shared x_T | share the SDE steps control |")
    print("|---|---|---|---|---|---|---|")
    for task, template in CASES:
        pool = [p for p in tasks.prompts(task, "train") if template is None or p.spec["template"] == template]
        drawn = random.Random(0).sample(pool, min(args.prompts, len(pool)))
        name = TASK_REWARDS[task]
        reward = make_reward(name)
        config = GRPOConfig(group_size=args.group, prompts_per_epoch=len(drawn), steps=8, guidance_scale=4.5,
                            noise_level=args.noise_level, epochs=1, seed=0)
        trainer = GRPOTrainer(pipe, policy, f"probe_{task}_{template or 'all'}", {name: reward}, config,
                              PromptSet(tuple(pool), name=task))
        outcomes: dict[str, dict[bool, np.ndarray]] = {}
        for shared in (False, True):
            with policy.disable():
                out = trainer.rollout_and_score(drawn, {name: reward}, torch.Generator().manual_seed(1),
                                                same_initial_noise=shared)
            per_sample: dict[str, list[float]] = {name: out.scores[name].tolist()}
            if task == "compose":
                scores = reward.score_batch(images_to_uint8(out.images), out.prompts)
                per_sample["strict"] = [s.strict for s in scores]
                constraints = scores[0].details["constraints"]
                if "relation" in constraints:
                    per_sample["relation holds"] = [float(s.details["constraints"]["relation"]) for s in scores]
                shape_keys = [k for k in constraints if k.endswith("_shape")]
                per_sample["shapes right"] = [float(all(s.details["constraints"][k] for k in shape_keys))
                                              for s in scores]
            for key, values in per_sample.items():
                outcomes.setdefault(key, {})[shared] = np.asarray(values, dtype=np.float64).reshape(len(drawn), -1)
        for key, both in outcomes.items():
            own, shared = (both[s].var(axis=1, ddof=1).mean() for s in (False, True))
            share = f"{shared / own:.2f}" if own > 0 else "-"
            print(f"| {task} | {template or '-'} | {key} | {both[False].mean():.2f} | {own:.4f} | {shared:.4f} | "
                  f"{share} |", flush=True)


if __name__ == "__main__":
    main()
