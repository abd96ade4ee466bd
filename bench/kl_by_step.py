"""Diagnostic: where along the trajectory does a teacher differ from a student (or the base), and how much of that
does the distillation loss see?

    python bench/kl_by_step.py --model models/binding --teacher RUN/nodes/teacher_quality/adapter \
        [--student RUN/nodes/opd/adapter] [--task quality] [--prompts 50]

The student (the base when ``--student`` is not given) draws SDE trajectories of the task's held-out prompts as a
distiller's rollouts do (8 steps, CFG 4.5, noise level 0.7). At every visited state the teacher's and the student's
CFG velocities are compared: per step, the mean squared velocity gap ||v_s - v_t||^2 / D, the KL weight w(t)
(docs/method.md §4) and each step's share of the summed per-step KL w(t) ||v_s - v_t||^2, which is what the
distiller minimises (steps not trained: the last one, as ``train_fraction`` leaves it). A teacher whose change
sits where w(t) is small is one the KL barely asks the student to follow (issue 20: the quality gap).
"""

from __future__ import annotations

from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy


def main() -> None:
    parser = diagnostic_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="the teacher's adapter folder")
    parser.add_argument("--student", default="", help="the student's adapter folder (empty: the base)")
    parser.add_argument("--task", default="quality", choices=("compose", "quality", "text"))
    parser.add_argument("--prompts", type=int, default=50, help="held-out prompts of the task (0 = all)")
    parser.add_argument("--images", type=int, default=2, help="trajectories per prompt")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompts < 0 or args.images < 1 or args.steps < 2:
        parser.error("--prompts must be >= 0, --images >= 1 and --steps >= 2 (the last step is not trained)")

    import torch

    from flowopd_core.miniworld.sets import prompt_set
    from flowopd_core.models.base_stamp import base_mismatch
    from flowopd_core.models.pipeline import TextEmbeddingCache, load_pipeline, velocity
    from flowopd_core.models.policy import BASE_ADAPTER, Policy
    from flowopd_core.sampling.generate import SampleConfig, generate
    from flowopd_core.sampling.samplers import flow_sigmas, kl_weight

    for name, folder in (("--teacher", args.teacher), ("--student", args.student)):
        if folder and (problem := base_mismatch(folder, args.model)):
            parser.error(f"{name}: {problem}")
    pipe = load_pipeline(args.model)
    policy = Policy(pipe.transformer)
    policy.load_adapter("teacher", args.teacher)
    if args.student:
        policy.load_adapter("student", args.student)
    prompts = prompt_set(args.task, "test", args.prompts, 0) if args.prompts else prompt_set(args.task, "test")
    texts = [p.text for p in prompts for _ in range(args.images)]
    config = SampleConfig(steps=args.steps, guidance_scale=4.5, kind="sde", noise_level=0.7, batch_size=64,
                          seed=args.seed)
    student = "student" if args.student else BASE_ADAPTER
    rollout = generate(pipe, texts, config, transformer=policy, adapter_names=[student] * len(texts))
    sigmas = flow_sigmas(args.steps, scheduler=pipe.scheduler)
    cache = TextEmbeddingCache(pipe)
    uncond = cache.encode([""])
    parts = [slice(start, start + 32) for start in range(0, len(texts), 32)]
    conds = [cache.encode(texts[part] * 2) for part in parts]  # each chunk twice: teacher rows, then student rows
    rows = []
    with torch.no_grad():
        for j in range(args.steps - 1):  # the last step is not trained (train_fraction)
            x, t, t_next = rollout.latents[:, j], float(sigmas[j]), float(sigmas[j + 1])
            gaps = []
            for part, cond in zip(parts, conds):
                xs = x[part]
                n = len(xs)  # one forward for both: peft's per-sample adapter names
                v = velocity(policy, torch.cat([xs, xs]), t, cond, uncond, 4.5,
                             adapter_names=["teacher"] * n + [student] * n)
                gaps.append((v[:n] - v[n:]).square().flatten(1).mean(1))
            gap = torch.cat(gaps)
            w = float(kl_weight(torch.tensor(t), torch.tensor(t_next)))
            rows.append((j, t, w, float(gap.mean()), w * float(gap.mean()) * x[0].numel()))
    total = sum(r[4] for r in rows)
    who = f"student {args.student}" if args.student else "the base"
    print(f"{args.task}: teacher {args.teacher} vs {who}; {len(texts)} SDE trajectories of {len(prompts)} "
          f"held-out prompts (the {'student' if args.student else 'base'} samples)\n")
    print("| step | t | w(t) | velocity gap (mean over D) | share of the summed KL |\n|---|---|---|---|---|")
    for j, t, w, gap, kl in rows:
        print(f"| {j} | {t:.3f} | {w:.3g} | {gap:.3g} | {f'{kl / total:.2f}' if total else '-'} |")


if __name__ == "__main__":
    main()
