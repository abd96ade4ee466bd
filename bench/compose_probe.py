"""Probe a compose-teacher recipe against its yardstick: the base and a random-reward control.

    python bench/compose_probe.py [--model models/miniworld] [--reward compose] [--templates single,count,pair]
        [--lr 1e-3] [--clip-range 1e-2] [--beta 0.01] [--epochs 16] [--prompts-per-epoch 8] [--balance] [--sde-eval]

Trains two Flow-GRPO adapters on one base with the same recipe and prompts (the compose training prompts of
``--templates``): one on ``--reward``, one on the blind ``random`` control. Then it scores the base and both on all
288 held-out compose prompts (2 images each, ODE 16 steps, CFG 4.5, the same noise for every model) and prints
each model's strict accuracy per category and the paired differences (teacher - base, control - base, teacher -
control) on the compose headline (the equal-weight category mean, strict and partial) with their 95 % intervals,
computed as the Evaluator does. Each adapter's mean compose score on its own training rollouts is printed per epoch
(the control logs it at weight 0, so the two curves measure the same thing), and so is their difference paired
by epoch (both draw the same prompts and noise each epoch). ``--sde-eval`` also scores the
held-out prompts with SDE samples drawn as a training rollout (8 steps, noise 0.7), to tell a gain the sampler
carries from one it does not (a third sampling pass of the 576 held-out samples per model). About 8 minutes on
2 cores without ``--sde-eval``.

Long probes run split, one adapter per one-thread process side by side (on 2 cores each epoch of 16 groups then
takes about 22 s), then evaluated together:

    OMP_NUM_THREADS=1 python bench/compose_probe.py --model M --only teacher --save DIR ... &
    OMP_NUM_THREADS=1 python bench/compose_probe.py --model M --only control --save DIR ... ; wait
    python bench/compose_probe.py --model M --load DIR

``--save`` writes each trained adapter (safetensors) to ``DIR/<teacher|control>`` and its rollout curve beside it;
``--load`` trains nothing and evaluates the base and the two adapters found there; ``--init DIR`` trains a further
slice from them (a fresh AdamW; pass another ``--seed`` for new prompts).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from _diagnostic import diagnostic_parser  # before torch: the checkout on the path, the thread policy

from flowopd_core.choices import DEVICES  # a constants module: imports no torch
from flowopd_core.models.base_stamp import BASE_STAMP, base_mismatch, stamp_adapter, transformer_digest


def main() -> None:
    parser = diagnostic_parser(__doc__)
    parser.add_argument("--reward", default="compose", help="the teacher's training reward")
    parser.add_argument("--templates", default="single,count,pair,position", help="training prompt categories")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-range", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.01, help="KL coefficient to the base (the trainer's beta)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--prompts-per-epoch", type=int, default=8, help="groups of 8 per epoch (8 optimizer steps)")
    parser.add_argument("--balance", action="store_true", help="balance_templates: categories evenly per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where the model runs (auto: a GPU when one is visible)")
    parser.add_argument("--sde-eval", action="store_true", help="also score held-out SDE samples (as rollouts)")
    parser.add_argument("--only", choices=("teacher", "control"), help="train this adapter alone (needs --save)")
    parser.add_argument("--save", help="folder to write the trained adapters to")
    parser.add_argument("--load", help="train nothing: evaluate the adapters a --save wrote to this folder")
    parser.add_argument("--init", help="start each adapter from the one a --save wrote to this folder (a longer probe "
                        "in slices; AdamW's moments start afresh, so give the slice another --seed for new prompts)")
    args = parser.parse_args()
    if args.only and not args.save:
        parser.error("--only needs --save: a lone adapter is evaluated by a later --load")
    if args.load and (args.only or args.save or args.init):
        parser.error("--load evaluates saved adapters; it takes neither --only, --save nor --init")
    for folder in (args.load, args.init):
        if folder and (problem := saved_problem(Path(folder), args.model)):
            parser.error(problem)
    for flag in ("epochs", "prompts_per_epoch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.beta >= 0:  # NaN fails too
        parser.error(f"--beta must be a number >= 0, got {args.beta}")

    from flowopd_core.eval.config import EvalConfig
    from flowopd_core.eval.evaluate import EvalTarget, evaluate_targets
    from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
    from flowopd_core.miniworld import tasks
    from flowopd_core.miniworld.sets import prompt_set
    from flowopd_core.models.modelref import resolve_device
    from flowopd_core.models.pipeline import load_pipeline
    from flowopd_core.models.policy import Policy
    from flowopd_core.prompts import PromptSet
    from flowopd_core.rewards.spec import build_reward, known_rewards

    if args.reward not in known_rewards():
        parser.error(f"unknown --reward {args.reward!r}; choose from {known_rewards()}")
    chosen = args.templates.split(",")
    unknown = sorted(set(chosen) - set(tasks.TEMPLATES["compose"]))
    if unknown:
        parser.error(f"unknown compose templates {unknown}; choose from {tasks.TEMPLATES['compose']}")
    train = PromptSet(tuple(p for p in tasks.prompts("compose", "train") if p.spec["template"] in chosen),
                      name="compose-train")
    config = GRPOConfig(group_size=8, prompts_per_epoch=args.prompts_per_epoch, steps=8, guidance_scale=4.5, lr=args.lr,
                        clip_range=args.clip_range, beta=args.beta, updates_per_epoch=8, ema_decay=0.0, lora_rank=16,
                        lora_alpha=32.0, epochs=args.epochs, seed=args.seed, balance_templates=args.balance)
    pipe = load_pipeline(args.model).to(resolve_device(args.device))
    policy = Policy(pipe.transformer)
    curves: dict[str, dict] = {}
    for adapter, reward in (("teacher", args.reward), ("control", "random")):
        if args.load:
            policy.load_adapter(adapter, Path(args.load) / adapter)
            saved_curve = Path(args.load) / f"{adapter}_rollouts.json"
            if saved_curve.is_file():
                curves[adapter] = json.loads(saved_curve.read_text())
            continue
        if args.only and adapter != args.only:
            continue
        if args.init:
            policy.load_adapter(adapter, Path(args.init) / adapter)
        rewards, weights = {reward: build_reward(reward)}, {}
        if reward != "compose":  # the compose score is logged beside the training reward, at weight 0
            rewards["compose"], weights["compose"] = build_reward("compose"), 0.0
        trainer = GRPOTrainer(pipe, policy, adapter, rewards, dataclasses.replace(config, reward_weights=weights),
                              train)
        print(f"{adapter} (trained on {reward}) compose score of its rollouts per epoch:", end="", flush=True)
        curve = curves[adapter] = {"model": str(Path(args.model).resolve()), "reward": reward, "seed": args.seed,
                                   "beta": args.beta, "balance": args.balance, "init": args.init,
                                   "compose_per_epoch": []}
        for _ in range(args.epochs):
            curve["compose_per_epoch"].append(trainer.epoch().to_json()["reward_mean"]["compose"])
            print(f" {curve['compose_per_epoch'][-1]:.2f}", end="", flush=True)
        print(flush=True)
        if args.save:
            print(f"saved {stamp_adapter(policy.save_adapter(adapter, Path(args.save) / adapter), args.model).parent}",
                  flush=True)
            (Path(args.save) / f"{adapter}_rollouts.json").write_text(json.dumps(curves[adapter]))
    if args.only:
        return
    rollout_gap(curves)
    test = prompt_set("compose", "test")
    evals = evaluate_targets(
        [EvalTarget("base", pipe, policy, None), EvalTarget("teacher", pipe, policy, "teacher"),
         EvalTarget("control", pipe, policy, "control")],
        test, EvalConfig(steps=16, guidance_scale=4.5, seed=0, batch_size=64, images_per_prompt=2, metrics="task"),
    )
    report("Held-out ODE samples (16 steps, as the Evaluator draws them)", [scored_from_eval(e) for e in evals])
    if args.sde_eval:
        report("Held-out SDE samples (8 steps, noise 0.7, as a training rollout)", sde_scored(pipe, policy, test, 2))


def saved_problem(saved: Path, model: str) -> str | None:
    """Why the adapters a ``--save`` wrote to ``saved`` cannot be loaded on the base ``model``, or None.

    Both adapters must be there, and each must have been trained on ``model``: by its base stamp (the same
    transformer weights: a checkout moved elsewhere, or a folder kept in the repository, still matches); a folder
    saved before adapters were stamped by the ``model_sha256`` its curve recorded, else by the folder's path."""
    missing = [a for a in ("teacher", "control") if not (saved / a / "adapter_model.safetensors").is_file()]
    if missing:
        return f"{saved}: no saved adapter for {missing} (adapter_model.safetensors)"
    for adapter in ("teacher", "control"):
        if (saved / adapter / BASE_STAMP).is_file():  # base_mismatch also refuses a stamp that is not one
            if problem := base_mismatch(saved / adapter, model):
                return f"{saved}: {problem}"
            continue
        curve = saved / f"{adapter}_rollouts.json"
        trained = json.loads(curve.read_text()) if curve.is_file() else {}
        if trained.get("model_sha256"):
            if trained["model_sha256"] != transformer_digest(model):
                return (f"{saved}: its {adapter} was trained on a base whose transformer weights have sha256 "
                        f"{trained['model_sha256'][:12]}..., not on --model {model}")
        elif trained.get("model") and Path(trained["model"]).resolve() != Path(model).resolve():
            return f"{saved}: its {adapter} was trained on {trained['model']}, not on --model {model}"
    return None


def rollout_gap(curves: dict[str, dict]) -> None:
    """Teacher - control on their own rollouts, paired by epoch: with the same seed both adapters draw the same
    prompts and the same noise each epoch (the training reward takes no random draws), so their epoch means differ
    only by what the adapters learned. Mean and 95 % interval (normal) over each half of the epochs. ``curves``:
    per adapter its settings and ``compose_per_epoch``."""
    teacher, control = curves.get("teacher"), curves.get("control")
    same = ("seed", "beta", "balance", "init")
    if (not teacher or not control or len(teacher["compose_per_epoch"]) != len(control["compose_per_epoch"])
            or any(teacher.get(k) != control.get(k) for k in same)):
        print("\n(no paired rollout curves: train both adapters with the same seed, epochs and slice to compare them)")
        return
    gap = np.asarray(teacher["compose_per_epoch"]) - np.asarray(control["compose_per_epoch"])
    print("\nTeacher - control, compose score of their own rollouts, paired by epoch (mean +- 95 % interval):")
    half = len(gap) // 2
    for name, part in (("first half", gap[:half]), ("second half", gap[half:]), ("all epochs", gap)):
        if len(part) > 1:
            width = 1.96 * part.std(ddof=1) / np.sqrt(len(part))
            print(f"  {name} ({len(part)} epochs): {part.mean():+.4f} +- {width:.4f}")


@dataclasses.dataclass(frozen=True)
class Scored:
    """One model's held-out samples: per sample ``strict`` / ``partial`` compose score ``(N,)``, the index of its
    prompt and its category."""

    name: str
    strict: np.ndarray
    partial: np.ndarray
    prompts: np.ndarray
    categories: list[str]

    def category_means(self, values: np.ndarray) -> list[float]:
        cats = np.asarray(self.categories)
        return [float(values[cats == c].mean()) for c in dict.fromkeys(self.categories)]


def scored_from_eval(e) -> Scored:
    """The compose rows of an Evaluator :class:`ModelEval` (every row: only compose prompts are scored)."""
    strict, partial = (np.asarray(t["compose"], dtype=np.float64) for t in (e.table.strict, e.table.scores))
    k = e.config.images_per_prompt
    return Scored(e.name, strict, partial, np.arange(len(strict)) // k, [s.category for s in e.samples])


def sde_scored(pipe, policy, prompts, images_per_prompt: int) -> list[Scored]:
    """Base, teacher and control on ``prompts`` with rollout-style SDE samples (the same noise for every model,
    the prompts encoded once)."""
    from flowopd_core.models.policy import BASE_ADAPTER
    from flowopd_core.rewards.spec import build_reward
    from flowopd_core.sampling.generate import SampleConfig, TextEmbeddingCache, generate

    reward, cache = build_reward("compose"), TextEmbeddingCache(pipe)
    specs = [p for p in prompts for _ in range(images_per_prompt)]
    config = SampleConfig(steps=8, guidance_scale=4.5, kind="sde", noise_level=0.7, batch_size=64, seed=0)
    out = []
    for name in ("base", "teacher", "control"):
        images = generate(pipe, [p.text for p in specs], config, cache=cache, transformer=policy.model,
                          adapter_names=[BASE_ADAPTER if name == "base" else name] * len(specs),
                          keep_latents=False).images
        result = reward(images, specs)
        out.append(Scored(name, result.strict.numpy().astype(np.float64), result.scores.numpy().astype(np.float64),
                          np.arange(len(specs)) // images_per_prompt, [p.category for p in specs]))
    return out


def headline_difference(a: Scored, b: Scored, *, strict: bool):
    """Paired ``a - b`` of the equal-weight category mean (strict or partial) with the Evaluator's interval
    (prompt means, stratified by category: ``paired_difference``'s computation)."""
    from flowopd_core.eval.report import mean_ci

    values = (a.strict - b.strict) if strict else (a.partial - b.partial)
    return mean_ci(values, a.prompts, 0.95, a.categories)


def category_difference(a: Scored, b: Scored, category: str):
    """Paired ``a - b`` of the strict accuracy on one category's prompts, with the Evaluator's interval."""
    from flowopd_core.eval.report import mean_ci

    rows = np.asarray(a.categories) == category
    return mean_ci((a.strict - b.strict)[rows], a.prompts[rows], 0.95)


def report(title: str, scored: list[Scored]) -> None:
    """Per model the strict accuracy per category and the partial mean; the paired differences of the headline."""
    categories = list(dict.fromkeys(scored[0].categories))
    print(f"\n{title}\n\n| model | " + " | ".join(categories) + " | partial |\n|---|" + "---|" * (len(categories) + 1))
    for m in scored:
        cells = m.category_means(m.strict) + [float(np.mean(m.category_means(m.partial)))]
        print(f"| {m.name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    print("\nPaired differences, compose strict (equal-weight category mean, 95 % interval; partial in brackets):")
    by_name = {m.name: m for m in scored}
    for a, b in (("teacher", "base"), ("control", "base"), ("teacher", "control")):
        strict, partial = (headline_difference(by_name[a], by_name[b], strict=flag) for flag in (True, False))
        print(f"  {a} - {b}: {strict.mean:+.3f} +- {strict.half_width:.3f} (partial {partial.mean:+.3f} "
              f"+- {partial.half_width:.3f})", flush=True)
    print("\nPaired differences per category, strict (95 % interval):")
    for a, b in (("teacher", "base"), ("control", "base"), ("teacher", "control")):
        cells = [category_difference(by_name[a], by_name[b], c) for c in categories]
        print(f"  {a} - {b}: " + ", ".join(f"{c} {d.mean:+.3f} +- {d.half_width:.3f}"
                                            for c, d in zip(categories, cells)), flush=True)


if __name__ == "__main__":
    main()
