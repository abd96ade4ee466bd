"""Diagnostic: how much of a GRPO group's reward spread comes from the SDE steps the policy is trained on, and how
much from the initial noise x_T, which no update changes?

    python bench/noise_share.py [--model models/binding] [--task text] [--prompts 16] [--repeats 2]

Draws Flow-GRPO rollouts of training prompts exactly as the trainer does (``GRPOTrainer.collect``: 8 samples per
prompt, 8 SDE steps, CFG 4.5, noise level 0.7), once with every sample on its own x_T and once with a group's
samples sharing one x_T (``same_initial_noise``, DanceGRPO). The mean within-group variance of the task's reward
with a shared x_T is what the steps alone cause; divided by the variance with own x_T it is the steps' share. A
small share means a group's advantages mostly rank x_T draws: credit the per-step log-probability gradient
gives to transitions that did not decide the outcome (issue 20, text on the binding base).
"""

from __future__ import annotations

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy


def main() -> None:
    parser = diagnostic_parser(__doc__)
    parser.add_argument("--task", default="text", choices=("compose", "quality", "text"))
    parser.add_argument("--prompts", type=int, default=16, help="training prompts (groups) per draw")
    parser.add_argument("--repeats", type=int, default=2, help="draws of --prompts groups per setting")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--min-step-std", type=float, default=0.01, help="the trainer's min_step_std (0: no floor)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
    from flowopd_core.miniworld import tasks
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.models.policy import Policy
    from flowopd_core.prompts import PromptSet
    from flowopd_core.rewards import TASK_REWARDS
    from flowopd_core.rewards.spec import build_reward

    prompts = PromptSet(tuple(tasks.prompts(args.task, "train")), name=f"{args.task}-train")
    reward = TASK_REWARDS[args.task]
    pipe = load_pipeline(args.model)
    policy = Policy(pipe.transformer)
    print(f"{args.model}, {args.task} ({reward}): {args.repeats} x {args.prompts} groups of 8 per setting, "
          f"8 SDE steps, CFG 4.5, noise level {args.noise_level}\n")
    print("| x_T | reward mean | within-group variance | groups with one reward | groups |\n|---|---|---|---|---|")
    variance = {}
    for shared in (False, True):
        config = GRPOConfig(group_size=8, prompts_per_epoch=args.prompts, steps=8, guidance_scale=4.5,
                            noise_level=args.noise_level, min_step_std=args.min_step_std, seed=args.seed,
                            same_initial_noise=shared)
        trainer = GRPOTrainer(pipe, policy, f"probe_{int(shared)}", {reward: build_reward(reward)}, config, prompts)
        groups = [trainer.collect().rewards[reward].view(-1, 8) for _ in range(args.repeats)]
        scores = torch.cat(groups)
        variance[shared] = float(scores.var(1).mean())
        flat = int((scores.std(1) == 0).sum())
        print(f"| {'shared per group' if shared else 'own per sample'} | {float(scores.mean()):.3f} | "
              f"{variance[shared]:.4f} | {flat} | {len(scores)} |", flush=True)
    print(f"\nshare of the within-group variance the SDE steps cause: {variance[True] / variance[False]:.2f}")


if __name__ == "__main__":
    main()
