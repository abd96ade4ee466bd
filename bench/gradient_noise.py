"""Diagnostic: how many GRPO groups does one reward need before its policy gradient is more signal than noise?

    python bench/gradient_noise.py [--model models/miniworld] [--groups 32] [--cases compose@compose,random@text,...]

For each case ``reward@task`` (``task`` may name a category: ``compose@compose/single``) it draws ``--groups``
training prompts of the task, one Flow-GRPO group of 8 rollouts each (8 steps, CFG 4.5, SDE noise 0.7, as the
mini-world teachers), and computes each group's policy gradient g_k on a fresh LoRA (rank 16, as the teachers; on
policy, so the PPO ratio is 1 and the clip inactive; no KL term): the gradient of the group's loss summed over its
trained steps, w.r.t. every trainable LoRA weight. From the G vectors (prompts drawn from the task's training
distribution) it estimates

- signal |E g|^2, unbiased: the mean of <g_i, g_j> over pairs i != j;
- noise tr(Sigma) = E|g|^2 - |E g|^2;
- the gradient noise scale B = tr(Sigma) / |E g|^2 (McCandlish et al. 2018, "B_simple"), in groups: how many
  groups one optimizer step must average for its direction to be as much signal as noise. A step of b groups
  carries signal share 1 / (1 + B / b).

B is reported with a bootstrap interval over the groups (2.5-97.5 %); where |E g|^2 is not above zero (the
blind ``random`` reward's expected gradient is 0), B is infinite: no batch finds a direction. The teachers
take one group's worth of samples per optimizer step (64 samples, 8 steps per epoch). Each group costs one
rollout of 8 samples and one backward pass per trained step.

Measured (docs/experiments.md, "What a group tells about compose"; the 18,000-step base): at 144 groups neither
compose's nor OCR's signal is above zero (B above 575 and 1,160 groups by the bootstrap), and OCR's teacher learns
in 128 groups; so this first-step measure does not separate a reward that teaches from one that does not.
"""

from __future__ import annotations

import math

import numpy as np
from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy

DEFAULT_CASES = "compose@compose,random@compose,ocr@text,random@text,quality@quality"


def noise_scale(grads: np.ndarray) -> tuple[float, float]:
    """Signal |E g|^2 (unbiased pair mean) and noise tr(Sigma) of per-group gradients ``grads`` ``(G, D)``."""
    g = grads.astype(np.float64)
    sq = (g * g).sum(axis=1)  # |g_i|^2
    total = g.sum(axis=0)
    n = len(g)
    signal = (float(total @ total) - float(sq.sum())) / (n * (n - 1))
    return signal, float(sq.mean()) - signal


def bootstrap_b(grads: np.ndarray, draws: int, seed: int) -> tuple[float, float]:
    """2.5 / 97.5 % bootstrap quantiles of B over resampled groups (pairs of one group with itself left out)."""
    rng = np.random.default_rng(seed)
    gram = grads.astype(np.float64) @ grads.astype(np.float64).T
    n = len(grads)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, n, n)
        sub = gram[np.ix_(pick, pick)]
        same = pick[:, None] == pick[None, :]  # a resampled group paired with a copy of itself is not a pair
        if same.all():
            continue
        signal = sub[~same].mean()
        noise = np.diag(sub).mean() - signal
        values.append(noise / signal if signal > 0 else math.inf)
    with np.errstate(invalid="ignore"):  # NaN only where it interpolates between two infinite draws
        lo, hi = np.quantile(values, [0.025, 0.975])
    return (math.inf if math.isnan(lo) else float(lo)), (math.inf if math.isnan(hi) else float(hi))


def main() -> None:
    parser = diagnostic_parser(__doc__, "pipeline folder")
    parser.add_argument("--groups", type=int, default=32, help="groups (prompts) per case")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated reward@task[/category]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.groups < 3:
        parser.error("--groups must be >= 3")

    import torch

    from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
    from flowopd_core.miniworld import tasks
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.models.policy import Policy
    from flowopd_core.prompts import PromptSet
    from flowopd_core.rewards.spec import build_reward, known_rewards

    cases = []
    for item in args.cases.split(","):
        reward, _, where = item.strip().partition("@")
        task, _, category = where.partition("/")
        if reward not in known_rewards():
            parser.error(f"case {item!r}: unknown reward {reward!r}; choose from {known_rewards()}")
        if task not in tasks.TEMPLATES or (category and category not in tasks.TEMPLATES[task]):
            parser.error(f"case {item!r}: task/category must be one of {tasks.TEMPLATES}")
        size = sum(1 for p in tasks.prompts(task, "train") if not category or p.spec["template"] == category)
        if size < args.groups:
            parser.error(f"case {item!r}: --groups {args.groups} exceeds its {size} training prompts")
        cases.append((reward, task, category))

    pipe = load_pipeline(args.model)
    policy = Policy(pipe.transformer)
    config = GRPOConfig(group_size=8, prompts_per_epoch=args.groups, steps=8, guidance_scale=4.5, beta=0.0,
                        lora_rank=16, lora_alpha=32.0, ema_decay=0.0, seed=args.seed)
    print(f"{args.model}: {args.groups} groups of 8 per case, fresh LoRA rank 16, on-policy gradient\n")
    print("| reward | prompts | reward mean | groups with no spread | signal abs(E g)^2 | noise tr(Sigma) "
          "| B (groups) | 95 % bootstrap |\n|---|---|---|---|---|---|---|---|")
    for index, (reward, task, category) in enumerate(cases):
        pool = [p for p in tasks.prompts(task, "train") if not category or p.spec["template"] == category]
        adapter = f"probe{index}"
        trainer = GRPOTrainer(pipe, policy, adapter, {reward: build_reward(reward)}, config,
                              PromptSet(tuple(pool), name=f"{task}-train"))
        batch = trainer.collect()
        params = trainer.policy.trainable_parameters(adapter)
        grads = []
        for group in range(args.groups):
            rows = torch.arange(group * 8, group * 8 + 8)
            trainer.optimizer.zero_grad(set_to_none=True)
            for k in range(batch.train_steps.shape[1]):
                trainer.step_loss(batch, rows, batch.train_steps[rows, k]).total.backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]).numpy().copy())
        grads = np.stack(grads)
        signal, noise = noise_scale(grads)
        b = noise / signal if signal > 0 else math.inf
        lo, hi = bootstrap_b(grads, 2000, args.seed)
        scores = batch.rewards[reward]
        flat = (batch.advantages.view(-1, 8) == 0).all(dim=1).float().mean().item()
        print(f"| {reward} | {task}{'/' + category if category else ''} | {scores.nanmean().item():.2f} | "
              f"{flat:.2f} | {signal:.3g} | {noise:.3g} | {b:.3g} | {lo:.3g}-{hi:.3g} |", flush=True)


if __name__ == "__main__":
    main()
