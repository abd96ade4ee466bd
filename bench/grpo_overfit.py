"""Diagnostic: can Flow-GRPO raise a reward on a few fixed training prompts of the shipped mini-world base?

A trainer that cannot raise its reward on two prompts it sees every epoch cannot gain on held-out prompts
either; one that can, but does not gain on held-out prompts, fails to generalise at that budget. Prints the
epoch's mean reward and clip fraction, one line per epoch.

    python bench/grpo_overfit.py --task compose --prompts "a green triangle|two red squares" \
        --lr 1e-3 --clip-range 1e-2 --epochs 20
"""

from __future__ import annotations

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy

from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld import tasks
from flowopd_core.models.pipeline import load_pipeline
from flowopd_core.models.policy import Policy
from flowopd_core.prompts import PromptSet
from flowopd_core.rewards import TASK_REWARDS
from flowopd_core.rewards.spec import build_reward


def main() -> None:
    parser = diagnostic_parser(__doc__)
    parser.add_argument("--task", choices=sorted(TASK_REWARDS), default="compose")
    parser.add_argument("--prompts", required=True, help="'|'-separated training prompts of the task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-range", type=float, default=1e-2)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--updates-per-epoch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-initial-noise", action="store_true",
                        help="a group's samples share x_T (the trainer's same_initial_noise)")
    parser.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a of the rollouts")
    args = parser.parse_args()

    known = {p.text: p for p in tasks.prompts(args.task, "train")}
    names = [n.strip() for n in args.prompts.split("|")]
    missing = [n for n in names if n not in known]
    if missing:
        parser.error(f"not {args.task} training prompts: {missing}")
    prompts = PromptSet(tuple(known[n] for n in names), name="overfit")
    reward = TASK_REWARDS[args.task]
    config = GRPOConfig(
        group_size=args.group_size, prompts_per_epoch=len(prompts), steps=8, guidance_scale=4.5, lr=args.lr,
        clip_range=args.clip_range, beta=0.01, updates_per_epoch=args.updates_per_epoch, ema_decay=0.0,
        lora_rank=16, lora_alpha=32.0, epochs=args.epochs, seed=args.seed,
        same_initial_noise=args.same_initial_noise, noise_level=args.noise_level,
    )
    pipe = load_pipeline(args.model)
    trainer = GRPOTrainer(pipe, Policy(pipe.transformer), "policy", {reward: build_reward(reward)}, config, prompts)
    print(f"| epoch | {reward} mean | clip fraction |\n|---|---|---|")
    for _ in range(args.epochs):
        metrics = trainer.epoch().to_json()
        print(f"| {metrics['epoch']} | {metrics['reward_mean'][reward]:.3f} | {metrics['clip_fraction']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
