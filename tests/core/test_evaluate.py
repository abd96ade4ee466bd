"""Evaluator: metric plans, Student-t statistics against scipy, NaN handling, deterministic and threaded ==
sequential runs on the tiny SD3 pipeline, real rewards on ground-truth renders, the written files, and
evaluating LoRA adapters on one shared base (issue 4)."""

import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from flowopd_core.eval.config import Comparison, parse_comparisons
from flowopd_core.eval.evaluate import (
    EvalConfig,
    EvalTarget,
    evaluate_model,
    evaluate_targets,
    metric_plan,
    target_sampler,
)
from flowopd_core.eval.report import compare, format_stat, mean_ci, paired_differences, summarise, write_results
from flowopd_core.miniworld.sets import prompt_set, render_set
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.rewards import REWARDS, Reward, SampleScore
from flowopd_core.sampling.generate import SampleConfig, generate

FAST = dict(steps=3, batch_size=4)


@dataclass(frozen=True)
class BrightnessConfig:
    pass


class Brightness(Reward):
    """Mean pixel value: a reward every image change moves (for the adapter test)."""

    name = "brightness"
    config_type = BrightnessConfig

    def score_batch(self, images, prompts):
        return [SampleScore(score=float(img.mean()) / 255.0) for img in images]


@pytest.fixture(scope="module")
def prompts():
    return prompt_set("all", "test", per_task=2, seed=0)  # 6 prompts, 3 tasks


def same(a, b):
    return torch.equal(torch.nan_to_num(a, nan=-1.0), torch.nan_to_num(b, nan=-1.0))


# ----------------------------------------------------------------------------------------- config and plan


def test_config_defaults_and_checks():
    config = EvalConfig()
    assert (config.steps, config.guidance_scale, config.images_per_prompt) == (40, 4.5, 1)
    assert config.metrics == "task+quality"
    for bad in (dict(steps=0), dict(batch_size=0), dict(images_per_prompt=0), dict(metrics="most"),
                dict(confidence=1.0), dict(guidance_scale=-1.0), dict(keep_images=-1)):
        with pytest.raises(ValueError):
            EvalConfig(**bad)


def test_metric_plan_modes():
    tasks, available = ["compose", "text", "quality"], list(REWARDS)
    assert metric_plan(tasks, "task+quality", available) == {
        "compose": ("compose", "quality"), "text": ("ocr", "quality"), "quality": ("quality",)}
    assert metric_plan(tasks, "task", available) == {"compose": ("compose",), "text": ("ocr",), "quality": ("quality",)}
    assert metric_plan(tasks, "all", available) == {t: tuple(REWARDS) for t in tasks}
    assert metric_plan(["", "compose"], "task+quality", available)[""] == ("quality",)  # untagged: side metric only
    with pytest.raises(ValueError, match="no reward"):
        metric_plan([""], "task", available)
    with pytest.raises(ValueError, match="needs rewards"):
        metric_plan(["text"], "task", ["compose", "quality"])
    for mode in ("task", "task+quality"):  # a tag no metric knows (a typo) is refused, not judged by quality only
        with pytest.raises(ValueError, match="'qualty' has no metric of its own"):
            metric_plan(["compose", "qualty"], mode, available)
    assert metric_plan(["qualty"], "task", available, {"qualty": "quality"}) == {"qualty": ("quality",)}


# ----------------------------------------------------------------------------------------- statistics


def test_mean_ci_matches_scipy_student_t():
    x = np.random.default_rng(0).uniform(0, 1, size=12)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    stat = mean_ci(torch.tensor(x))
    assert stat.mean == pytest.approx(x.mean(), abs=1e-12)
    assert (stat.low, stat.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert (stat.n, stat.n_prompts) == (12, 12)
    low90, _ = stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean_ci(x, confidence=0.9).low == pytest.approx(low90, abs=1e-12)


def test_mean_ci_groups_images_by_prompt_and_skips_nan():
    values = np.array([0.2, 0.4, 1.0, np.nan, 0.5, 0.7, np.nan, np.nan])
    groups = [0, 0, 1, 1, 2, 2, 3, 3]  # prompt 3 was never scored
    prompt_means = np.array([0.3, 1.0, 0.6])
    low, high = stats.t.interval(0.95, 2, loc=prompt_means.mean(), scale=stats.sem(prompt_means))
    stat = mean_ci(values, groups)
    assert (stat.n, stat.n_prompts) == (5, 3)
    assert stat.mean == pytest.approx(prompt_means.mean())
    assert (stat.low, stat.high) == (pytest.approx(low), pytest.approx(high))
    empty = mean_ci([math.nan, math.nan])
    assert (empty.n, empty.n_prompts) == (0, 0) and math.isnan(empty.mean)
    single = mean_ci([0.5, math.nan])
    assert single.mean == 0.5 and math.isnan(single.half_width) and single.n == 1
    assert format_stat(single, expected_n=2) == "0.50 (n=1)" and format_stat(empty, 2) == "–"


# ----------------------------------------------------------------------------------------- real rewards, files


def test_ground_truth_scores_near_one_and_files_list_every_model_and_task(prompts, tmp_path):
    truth = render_set(prompts, seed=0, size=32)
    blank = torch.ones_like(truth)
    config = EvalConfig(batch_size=4, keep_images=2)
    evals = [evaluate_model("ground truth", lambda texts, idx: truth[list(idx)], prompts, config),
             evaluate_model("blank", lambda texts, idx: blank[list(idx)], prompts, config)]
    results = summarise(evals)
    for task, metric in (("compose", "compose"), ("text", "ocr"), ("quality", "quality")):
        good, bad = results.get("ground truth", task, metric), results.get("blank", task, metric)
        assert good.score.mean >= 0.95 and good.score.n == 2, (task, good)
        assert bad.score.mean <= 0.2, (task, bad)
    assert results.get("ground truth", "compose", "compose").strict.mean == 1.0
    assert results.get("blank", "compose", "compose").strict.mean == 0.0
    assert results.get("ground truth", "text", "quality").score.mean >= 0.9  # side metric on every task
    assert results.average("ground truth") >= 0.95 and results.average("blank") <= 0.2
    assert [results.headline_label(t) for t in results.tasks] == ["compose strict", "ocr", "quality"]

    files = write_results(results, tmp_path)
    table = files.markdown.read_text()
    for name in ("ground truth", "blank", "compose: compose", "compose: compose strict", "text: ocr",
                 "text: quality", "quality: quality", "average", "40 steps", "CFG 4.5"):
        assert name in table
    assert len(table.splitlines()[0].split("|")) == len(table.splitlines()[2].split("|"))
    data = json.loads(files.json.read_text())
    assert data["models"] == ["ground truth", "blank"] and data["tasks"] == ["compose", "text", "quality"]
    assert len(data["samples"]["blank"]) == 6 and data["samples"]["blank"][0]["prompt_id"] == prompts[0].id
    row = next(r for r in data["summary"] if (r["model"], r["task"], r["metric"]) == ("ground truth", "text", "ocr"))
    assert row["score"]["mean"] == pytest.approx(results.get("ground truth", "text", "ocr").score.mean)
    assert len(files.grids) == 6 and files.chart.is_file()
    for path in files.grids + (files.chart,):
        assert Image.open(path).format == "PNG"
    # paired differences to the first model: blank - truth, per sample, on each task's headline metric
    paired = paired_differences(results)["blank"]
    for task, metric, strict in (("compose", "compose", True), ("text", "ocr", False), ("quality", "quality", False)):
        table_of = (lambda e: e.table.strict) if strict else (lambda e: e.table.scores)
        rows = evals[0].sample_rows(task)
        want = (table_of(evals[1])[metric][rows] - table_of(evals[0])[metric][rows]).double().mean().item()
        assert paired[task].mean == pytest.approx(want) and paired[task].mean < -0.7, (task, paired[task])
    assert "Paired differences to ground truth" in table and "* = the interval excludes 0" in table
    assert data["paired_to_first"]["blank"]["text"]["mean"] == pytest.approx(paired["text"].mean)


def test_unscorable_images_are_counted_out_and_written_as_null(prompts, tmp_path):
    images = render_set(prompts, seed=0, size=32)
    images[0] = math.nan  # a compose sample no reward can score
    run = evaluate_model("broken", lambda texts, idx: images[list(idx)], prompts, EvalConfig(batch_size=4))
    results = summarise([run])
    compose = results.get("broken", "compose", "compose")
    assert (compose.score.n, compose.strict.n, compose.score.n_prompts) == (1, 1, 1)
    assert compose.score.mean >= 0.95 and math.isnan(compose.score.half_width)
    assert results.get("broken", "text", "ocr").score.n == 2
    files = write_results(results, tmp_path)
    assert "(n=1)" in files.markdown.read_text()
    sample = json.loads(files.json.read_text())["samples"]["broken"][0]
    assert sample["scores"] == {"compose": None, "quality": None} and sample["details"]["compose"]["error"]


# ----------------------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TEST_CONFIG, seed=0)


def test_sampler_matches_generate_ode(pipe, prompts):
    config = EvalConfig(**FAST)
    images = target_sampler(EvalTarget("base", pipe), config)(prompts.texts, range(len(prompts)))
    expected = generate(pipe, prompts.texts, SampleConfig(steps=3, kind="ode", batch_size=len(prompts), seed=0))
    # the evaluator batches differently: equal to rounding (a CPU's BLAS may pick other kernels per batch size)
    assert torch.allclose(images, expected.images, rtol=0, atol=1e-5)


def test_runs_are_deterministic_and_threaded_equals_sequential(pipe, prompts):
    rewards = {"brightness": Brightness()}
    config = EvalConfig(**FAST, metrics="all", images_per_prompt=2, keep_images=1)
    sequential = replace(config, concurrent=False)
    runs = [evaluate_model("m", pipe, prompts, config, rewards),
            evaluate_model("m", pipe, prompts, sequential, rewards),
            evaluate_model("m", pipe, prompts, config, rewards)]
    for run in runs[1:]:
        assert same(run.table.scores["brightness"], runs[0].table.scores["brightness"])
        assert torch.equal(run.images, runs[0].images) and run.image_index == runs[0].image_index
    assert runs[0].table.scores["brightness"].shape == (12,) and runs[0].image_index == (0, 4, 8)  # first per task
    other = evaluate_model("m", pipe, prompts, replace(config, seed=1), rewards)
    assert not torch.allclose(other.images, runs[0].images)
    stat = summarise([runs[0]]).get("m", "text", "brightness").score
    assert (stat.n, stat.n_prompts) == (4, 2)  # two images per prompt, averaged per prompt


def test_default_rewards_on_generated_images(pipe, prompts):
    run = evaluate_model("tiny", pipe, prompts, EvalConfig(**FAST))
    assert set(run.table.scores) == {"compose", "ocr", "quality"}
    assert set(run.table.strict) == {m for m in run.table.scores if REWARDS[m].has_strict}
    text_rows = run.sample_rows("text")
    assert torch.isnan(run.table.scores["compose"][text_rows]).all()  # not planned for the text task
    assert not torch.isnan(run.table.scores["quality"]).any()  # the side metric runs on every task


def test_adapters_on_one_base_are_evaluated_by_switching(prompts, tmp_path):
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    rewards, config = {"brightness": Brightness()}, EvalConfig(**FAST, metrics="all", keep_images=0)
    before = evaluate_model("base", pipe, prompts, config, rewards)
    policy = Policy(pipe.transformer)
    policy.add_adapter("teacher", LoraSpec(rank=4, alpha=8.0, init=False))
    policy.add_adapter("student", LoraSpec(rank=4, alpha=8.0, init=False))
    with pytest.raises(ValueError, match="carries LoRA"):
        EvalTarget("base", pipe)
    with pytest.raises(KeyError):
        EvalTarget("x", pipe, policy, "missing")
    targets = [EvalTarget(name, pipe, policy, adapter)
               for name, adapter in (("teacher", "teacher"), ("base", None), ("student", "student"))]
    teacher, base, student = evaluate_targets(targets, prompts, config, rewards)
    assert torch.equal(base.images, before.images)
    assert same(base.table.scores["brightness"], before.table.scores["brightness"])
    for adapted in (teacher, student):
        assert (adapted.images - base.images).abs().amax() > 1e-3
        assert not torch.allclose(adapted.table.scores["brightness"], base.table.scores["brightness"])
    assert (teacher.images - student.images).abs().amax() > 1e-3
    assert policy.active == "teacher"  # evaluation selects adapters per sample; the active one is unchanged
    table = write_results(summarise([teacher, base, student]), tmp_path).markdown.read_text()
    assert all(f"| {name} |" in table for name in ("teacher", "base", "student"))


def test_category_means_weigh_categories_equally():
    """GenEval-style: the task value is the mean of its category means; the interval is the stratified one."""
    from scipy import stats as st

    from flowopd_core.eval.report import mean_ci

    rng = np.random.default_rng(0)
    a, b = rng.random(40), rng.random(5) + 1.0
    values = np.concatenate([a, b])
    strata = ["big"] * 40 + ["small"] * 5
    got = mean_ci(values, strata=strata)
    assert got.mean == pytest.approx((a.mean() + b.mean()) / 2)
    assert got.n == 45 and got.n_prompts == 45
    va, vb = a.var(ddof=1) / 40, b.var(ddof=1) / 5
    df = (va + vb) ** 2 / (va**2 / 39 + vb**2 / 4)
    assert got.half_width == pytest.approx(st.t.ppf(0.975, df) * np.sqrt(va + vb) / 2)
    # one category: the plain interval
    assert mean_ci(a, strata=["x"] * 40) == mean_ci(a)


def test_grids_keep_images_of_every_category():
    from flowopd_core.eval.evaluate import kept_samples
    from flowopd_core.prompts import PromptSpec

    specs = [PromptSpec(f"p{i}", task="compose", spec={"template": t}) for i, t in
             enumerate(["single"] * 6 + ["count"] * 3 + ["pair"] * 2 + ["position"] * 5)]
    specs += [PromptSpec(f"q{i}", task="quality") for i in range(4)]
    kept = kept_samples(specs, 6)
    compose = sorted(specs[i].category for i in kept if specs[i].task == "compose")
    # round robin: one of each category, then the next of each; the first 6 samples would all be "single"
    assert compose == ["count", "count", "pair", "position", "single", "single"]
    assert sorted(i for i in kept if specs[i].task == "quality") == [16, 17, 18, 19]
    assert kept_samples(specs, 0) == set(range(len(specs)))
    assert len([i for i in kept_samples(specs, 100) if specs[i].task == "compose"]) == 16


def test_parse_comparisons_reads_labels_with_dashes_and_refuses_malformed_rows():
    got = parse_comparisons("flow-opd vs grpo-mix; flow-opd vs flow-opd-no-mar\n flow-opd vs grpo-text @ text ;")
    assert got == (Comparison("flow-opd", "grpo-mix"), Comparison("flow-opd", "flow-opd-no-mar"),
                   Comparison("flow-opd", "grpo-text", "text"))
    assert str(got[2]) == "flow-opd vs grpo-text @ text" and parse_comparisons("  ") == ()
    for bad, why in (("flow-opd - grpo-mix", "not 'A vs B'"), ("a vs b vs c", "not 'A vs B'"),
                     ("a vs b @", "not 'A vs B'"), ("a vs a", "itself"), ("a vs b; a vs b", "repeat")):
        with pytest.raises(ValueError, match=why):
            parse_comparisons(bad)
    with pytest.raises(ValueError, match="itself"):
        EvalConfig(comparisons="x vs x")


def test_comparisons_are_paired_differences_between_any_two_models(tmp_path):
    """Method-vs-method rows from code: per task the paired difference A - B (what results.md pairs with the first
    model, for any two), the average over the tasks with half-width sqrt(sum h^2) / T, in results.md and .json."""
    prompts = prompt_set("all", "test", per_task=8, seed=0)  # enough prompts per category for finite intervals
    truth = render_set(prompts, seed=0, size=32)
    blank = torch.ones_like(truth)
    noisy = (truth + 0.3 * torch.rand(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    config = EvalConfig(batch_size=4, keep_images=2,
                        comparisons="ground truth vs blank; noisy vs blank @ text; blank vs noisy")
    evals = [evaluate_model(name, lambda texts, idx, images=images: images[list(idx)], prompts, config)
             for name, images in (("blank", blank), ("ground truth", truth), ("noisy", noisy))]
    results = summarise(evals)
    rows = compare(results, parse_comparisons(config.comparisons))
    to_blank = paired_differences(results)  # every model - blank (the first)
    for task in results.tasks:
        assert rows[0].by_task[task].mean == pytest.approx(to_blank["ground truth"][task].mean)
        assert rows[0].by_task[task].half_width == pytest.approx(to_blank["ground truth"][task].half_width)
        assert rows[2].by_task[task].mean == pytest.approx(-to_blank["noisy"][task].mean)  # B - A = -(A - B)
    assert set(rows[1].by_task) == {"text"} and rows[1].average is None
    assert rows[1].by_task["text"].mean == pytest.approx(to_blank["noisy"]["text"].mean)
    parts = list(rows[0].by_task.values())
    assert rows[0].average.mean == pytest.approx(sum(p.mean for p in parts) / 3) and rows[0].average.mean > 0.7
    assert rows[0].average.half_width == pytest.approx(math.sqrt(sum(p.half_width**2 for p in parts)) / 3)

    files = write_results(results, tmp_path)
    table = files.markdown.read_text()
    assert "Method vs method" in table and "| ground truth vs blank | +" in table
    assert "| noisy vs blank @ text | – | +" in table
    data = json.loads(files.json.read_text())
    assert [(c["a"], c["b"], c["task"]) for c in data["comparisons"]] == [
        ("ground truth", "blank", ""), ("noisy", "blank", "text"), ("blank", "noisy", "")]
    assert data["comparisons"][0]["average"]["mean"] == pytest.approx(rows[0].average.mean)
    with pytest.raises(ValueError, match="no model labelled 'flow-opd'"):
        compare(results, parse_comparisons("flow-opd vs blank"))


def test_a_comparison_naming_no_model_is_refused_before_any_sampling(prompts):
    class NeverSampled:
        name = "base"

        @property
        def pipeline(self):
            raise AssertionError("sampled before the comparisons were checked")

    config = EvalConfig(comparisons="flow-opd vs base @ compose; base vs nope")
    with pytest.raises(ValueError, match=r"no model labelled 'flow-opd'.*no model labelled 'nope'"):
        evaluate_targets([NeverSampled()], prompts, config)
