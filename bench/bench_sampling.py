"""SDE sampling with log-probs (ours) vs the plain diffusers pipeline call, same model, steps and batch.

    python bench/bench_sampling.py [--model PIPELINE_FOLDER] [--steps 10] [--batch 16] [--repeats 7]

Both sides get pre-encoded text (the pipeline via prompt_embeds), CFG 4.5, and return final latents; the
figure is the median over interleaved repeats. Target (issue 3): ours <= 1.05x the pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowopd_core.generate import SampleConfig, generate, sample_noise  # noqa: E402
from flowopd_core.miniworld.sets import prompt_set  # noqa: E402
from flowopd_core.miniworld.tiny import TinyConfig, build_tiny_pipeline  # noqa: E402
from flowopd_core.pipeline import TextEmbeddingCache, load_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models" / "miniworld"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    folder = Path(args.model)
    pipe = load_pipeline(folder) if (folder / "model_index.json").is_file() else build_tiny_pipeline(TinyConfig())
    pipe.set_progress_bar_config(disable=True)
    texts = prompt_set("all", "test").texts[: args.batch]
    cache = TextEmbeddingCache(pipe)
    cond, neg = cache.encode(texts), cache.negative(len(texts))
    noise = sample_noise(pipe, range(len(texts)), seed=0)
    config = SampleConfig(steps=args.steps, guidance_scale=4.5, kind="sde", batch_size=len(texts))

    def ours() -> None:
        generate(pipe, texts, config, cache=cache)

    def plain() -> None:
        pipe(
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled,
            negative_prompt_embeds=neg.prompt_embeds.contiguous(),
            negative_pooled_prompt_embeds=neg.pooled.contiguous(),
            latents=noise.clone(),
            num_inference_steps=args.steps,
            guidance_scale=4.5,
            output_type="latent",
        )

    times: dict[str, list[float]] = {"ours (SDE + log-probs + decode)": [], "diffusers pipeline (ODE)": []}
    with torch.no_grad():
        ours(), plain()  # warm-up
        for _ in range(args.repeats):
            for name, fn in zip(times, (ours, plain)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["diffusers pipeline (ODE)"]
    print(f"| sampler ({args.batch} images, {args.steps} steps, CFG 4.5) | median s | ratio |\n|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.3f} | {value / base:.3f} |")
    ratio = med["ours (SDE + log-probs + decode)"] / base
    verdict = "met" if ratio <= 1.05 else "MISSED"
    print(f"\n{'Shipped mini-world base' if (folder / 'model_index.json').is_file() else 'Tiny random pipeline'}, "
          f"median of {args.repeats} interleaved repeats, text pre-encoded on both sides; torch threads "
          f"{torch.get_num_threads()}.")
    print(f"Target (issues 3, 9): SDE sampling with log-probs <= 1.05x plain pipeline sampling: **{verdict}** "
          f"({ratio:.2f}x).")


if __name__ == "__main__":
    main()
