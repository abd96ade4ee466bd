"""Statistics and files of an evaluation (issue 4): per model x task x metric means with confidence intervals,
``results.json``, a Markdown table, PNG grids per model and task and a bar chart.

Statistics (:func:`mean_ci`): the unit is the prompt. A prompt's score is the mean of its scored images
(NaN = cannot score, skipped); the reported mean is the mean over the m prompts with a scored image and the
interval is Student's t over the prompt means, ``mean +- t_{(1+c)/2, m-1} s / sqrt(m)`` (c = 0.95, s the
sample standard deviation of the prompt means); it is undefined (NaN) for m < 2. ``n`` counts scored samples.
Strict accuracy (1/0 per image, GenEval-style) gets the same treatment for rewards that have one. With one
image per prompt this is the textbook t-interval over images; with several, images of one prompt are not
independent, which is why they are averaged first.

Categories: when a task's prompts carry a category (``spec["template"]``, e.g. compose's ``count`` and
``position``), the task's value is the equal-weight mean of its category means, as GenEval's overall score is
the mean over its task categories; otherwise a category with many prompts would outweigh the rest. The
interval is then the stratified one: ``half_width = t_{(1+c)/2, df} sqrt(sum_k s_k^2 / m_k) / K`` with
Welch-Satterthwaite df. A task with one category gets the plain interval above.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats

from flowopd_core.eval.config import Comparison, comparison_problems, parse_comparisons
from flowopd_core.eval.evaluate import EvalConfig, ModelEval
from flowopd_core.images import save_grid
from flowopd_core.rewards import TASK_REWARDS

HEADLINE_STRICT: tuple[str, ...] = ("compose",)
"""Rewards whose headline value is their strict accuracy (GenEval reports the share of fully correct images);
every other reward's headline is its mean score (the paper's OCR metric is the mean edit-distance score)."""

@dataclass(frozen=True)
class Stat:
    """Mean with a confidence interval ``mean +- half_width`` (NaN when fewer than 2 prompts were scored);
    ``n`` scored samples over ``n_prompts`` prompts."""

    mean: float
    half_width: float
    n: int
    n_prompts: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self) | {"low": self.low, "high": self.high})


def mean_ci(
    values: torch.Tensor | np.ndarray | Sequence[float],
    groups: Sequence[int] | None = None,
    confidence: float = 0.95,
    strata: Sequence[str] | None = None,
) -> Stat:
    """Mean over prompts with a Student-t interval (module doc): prompt means ``p_1..p_m`` of the scored
    values, ``mean = p̄``, ``half_width = t_{(1+c)/2, m-1} std(p) / sqrt(m)``. ``values`` ``(N,)``, NaN = not
    scored; ``groups`` ``(N,)`` the prompt of each value (default: every value its own prompt)."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    if strata is not None and len(set(strata)) > 1:
        return _stratified_ci(values, groups, np.asarray(strata), confidence)
    scored = ~np.isnan(values)
    if not scored.any():
        return Stat(math.nan, math.nan, 0, 0)
    _, prompt = np.unique(groups[scored], return_inverse=True)
    means = np.bincount(prompt, weights=values[scored]) / np.bincount(prompt)
    m = len(means)
    half = math.nan
    if m > 1:
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, m - 1) * means.std(ddof=1) / math.sqrt(m))
    return Stat(float(means.mean()), half, int(scored.sum()), m)


def _stratified_ci(values: np.ndarray, groups: np.ndarray, strata: np.ndarray, confidence: float) -> Stat:
    """Equal-weight mean of per-category :func:`mean_ci` means with the stratified interval (module doc)."""
    parts = [mean_ci(values[strata == k], groups[strata == k], confidence) for k in dict.fromkeys(strata.tolist())]
    parts = [p for p in parts if p.n_prompts > 0]
    if not parts:
        return Stat(math.nan, math.nan, 0, 0)
    mean = float(np.mean([p.mean for p in parts]))
    n, m = sum(p.n for p in parts), sum(p.n_prompts for p in parts)
    if any(p.n_prompts < 2 for p in parts):
        return Stat(mean, math.nan, n, m)
    # s_k^2 / m_k recovered from each category's own half-width
    terms = [(p.half_width / stats.t.ppf((1.0 + confidence) / 2.0, p.n_prompts - 1)) ** 2 for p in parts]
    k = len(parts)
    se = math.sqrt(sum(terms)) / k
    denom = sum(term**2 / (p.n_prompts - 1) for term, p in zip(terms, parts))
    df = sum(terms) ** 2 / denom if denom > 0 else float(m - 1)
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, df) * se) if se > 0 else 0.0
    return Stat(mean, half, n, m)


@dataclass(frozen=True)
class MetricSummary:
    """One cell of the results: ``model`` x ``task`` x ``metric``; ``strict`` for rewards with a strict form."""

    model: str
    task: str
    metric: str
    score: Stat
    strict: Stat | None

    @property
    def headline(self) -> Stat:
        """The strict accuracy for rewards in :data:`HEADLINE_STRICT`, else the mean score."""
        return self.strict if self.strict is not None and self.metric in HEADLINE_STRICT else self.score

    @property
    def headline_label(self) -> str:
        return self.metric + (" strict" if self.headline is self.strict else "")


@dataclass
class Results:
    """Summaries of several :class:`ModelEval` on the same prompts and settings."""

    config: EvalConfig
    prompt_set: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    plan: dict[str, tuple[str, ...]]
    rows: tuple[MetricSummary, ...]
    evals: tuple[ModelEval, ...]

    def get(self, model: str, task: str, metric: str) -> MetricSummary:
        for row in self.rows:
            if (row.model, row.task, row.metric) == (model, task, metric):
                return row
        raise KeyError(f"no result for model {model!r}, task {task!r}, metric {metric!r}")

    def task_metric(self, task: str) -> str:
        """A task's own metric (``config.task_rewards``, else ``TASK_REWARDS``), else the first of its plan."""
        own = {**TASK_REWARDS, **self.config.task_rewards}.get(task)
        return own if own in self.plan[task] else self.plan[task][0]

    def average(self, model: str) -> float:
        """Mean over tasks of each task's headline value (NaN when a task has none)."""
        return float(np.mean([self.get(model, t, self.task_metric(t)).headline.mean for t in self.tasks]))

    def headline_label(self, task: str) -> str:
        """What the average and the chart show for ``task``, e.g. ``compose strict``."""
        return self.get(self.models[0], task, self.task_metric(task)).headline_label

    def expected_n(self, task: str) -> int:
        return sum(p.task == task for p in self.evals[0].prompts) * self.config.images_per_prompt


def summarise(evals: Sequence[ModelEval]) -> Results:
    """Per model x task x metric statistics (:func:`mean_ci`, grouped by prompt)."""
    if not evals:
        raise ValueError("nothing to summarise")
    first = evals[0]
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    ids = [p.id for p in first.prompts]
    for e in evals[1:]:
        if e.config != first.config or [p.id for p in e.prompts] != ids or e.plan != first.plan:
            raise ValueError(f"{e.name} was evaluated on other prompts or settings than {first.name}")
    k = first.config.images_per_prompt
    rows = []
    for e in evals:
        for task, metrics in e.plan.items():
            idx = e.sample_rows(task)
            groups = [i // k for i in idx]
            strata = [e.samples[i].category for i in idx]
            for metric in metrics:
                score = mean_ci(e.table.scores[metric][idx], groups, e.config.confidence, strata)
                strict = e.table.strict.get(metric)
                strict = mean_ci(strict[idx], groups, e.config.confidence, strata) if strict is not None else None
                rows.append(MetricSummary(e.name, task, metric, score, strict))
    return Results(first.config, first.prompts.name, tuple(names), tuple(first.plan), dict(first.plan),
                   tuple(rows), tuple(evals))


def paired_difference(results: Results, a: str, b: str, task: str) -> Stat:
    """The paired difference ``a - b`` of ``task``'s headline metric: per sample d_i = value_a,i - value_b,i (same
    prompt, same noise), then :func:`mean_ci` over prompts (stratified by category like the headline). Far
    narrower than comparing two intervals, because the prompt-to-prompt spread cancels; an interval that excludes
    0 is a difference at that confidence."""
    ea, eb = (results.evals[results.models.index(name)] for name in (a, b))
    k = ea.config.images_per_prompt
    metric = results.task_metric(task)
    strict = results.get(a, task, metric).headline is results.get(a, task, metric).strict
    idx = ea.sample_rows(task)
    table_a, table_b = (e.table.strict if strict else e.table.scores for e in (ea, eb))
    diff = np.asarray(table_a[metric][idx], dtype=np.float64) - np.asarray(table_b[metric][idx], dtype=np.float64)
    strata = [ea.samples[i].category for i in idx]
    return mean_ci(diff, [i // k for i in idx], ea.config.confidence, strata)


def paired_differences(results: Results) -> dict[str, dict[str, Stat]]:
    """model -> task -> :func:`paired_difference` to the FIRST model (the reference, e.g. the base)."""
    ref = results.models[0]
    return {m: {t: paired_difference(results, m, ref, t) for t in results.tasks} for m in results.models[1:]}


@dataclass(frozen=True)
class ComparisonRow:
    """A method-vs-method row: per task the paired difference ``a - b`` (:func:`paired_difference`), and over the
    tasks compared their mean with half-width sqrt(sum h_t^2) / T (tasks have disjoint prompts, so the T task
    differences are independent; NaN half-width when a task's is)."""

    comparison: Comparison
    by_task: dict[str, Stat]
    average: Stat | None


def compare(results: Results, comparisons: Sequence[Comparison]) -> list[ComparisonRow]:
    """One :class:`ComparisonRow` per comparison (labels and tasks must be among the results')."""
    problems = comparison_problems(comparisons, results.models, results.tasks)
    if problems:
        raise ValueError("; ".join(problems))
    rows = []
    for c in comparisons:
        by_task = {t: paired_difference(results, c.a, c.b, t) for t in results.tasks if not c.task or t == c.task}
        average = None
        if len(by_task) > 1:
            parts = list(by_task.values())
            mean = float(np.mean([p.mean for p in parts]))
            half = math.sqrt(sum(p.half_width**2 for p in parts)) / len(parts)
            average = Stat(mean, half, sum(p.n for p in parts), sum(p.n_prompts for p in parts))
        rows.append(ComparisonRow(c, by_task, average))
    return rows


# ---------------------------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class ResultFiles:
    """Paths written by :func:`write_results`."""

    json: Path
    markdown: Path
    chart: Path
    grids: tuple[Path, ...]


def write_results(results: Results, out_dir: str | Path) -> ResultFiles:
    """Write ``results.json``, ``results.md``, ``chart.png`` and ``grids/<model>_<task>.png`` to ``out_dir``."""
    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results_json(results), indent=1, allow_nan=False), encoding="utf-8")
    md_path = out / "results.md"
    md_path.write_text(markdown_table(results), encoding="utf-8")
    chart = save_chart(results, out / "chart.png")
    grids = tuple(save_task_grid(results, e, task, out / "grids" / f"{_slug(e.name)}_{_slug(task)}.png")
                  for e in results.evals for task in results.tasks)
    return ResultFiles(json_path, md_path, chart, grids)


def results_json(results: Results) -> dict[str, Any]:
    """Everything, machine-readable: settings, summaries, averages and every sample's scores (NaN -> null)."""
    return {
        "config": asdict(results.config),
        "statistics": f"mean over prompts, Student-t {results.config.confidence:.0%} interval over prompt means",
        "prompt_set": results.prompt_set,
        "models": list(results.models),
        "tasks": list(results.tasks),
        "plan": {task: list(metrics) for task, metrics in results.plan.items()},
        "headline": {task: results.headline_label(task) for task in results.tasks},
        "average": {m: _jsonable(results.average(m)) for m in results.models},
        "summary": [
            {"model": r.model, "task": r.task, "metric": r.metric, "score": r.score.to_json(),
             "strict": r.strict.to_json() if r.strict is not None else None}
            for r in results.rows
        ],
        "paired_to_first": {m: {t: stat.to_json() for t, stat in tasks.items()}
                            for m, tasks in paired_differences(results).items()},
        "comparisons": [
            {"a": row.comparison.a, "b": row.comparison.b, "task": row.comparison.task,
             "by_task": {t: stat.to_json() for t, stat in row.by_task.items()},
             "average": row.average.to_json() if row.average is not None else None}
            for row in compare(results, parse_comparisons(results.config.comparisons))
        ],
        "samples": {e.name: _samples_json(e) for e in results.evals},
        "seconds": {e.name: e.seconds for e in results.evals},
    }


def _samples_json(e: ModelEval) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(e.samples):
        metrics = e.plan[spec.task]
        out.append({
            "index": i, "prompt_id": spec.id, "task": spec.task, "category": spec.category, "text": spec.text,
            "scores": {m: _jsonable(float(e.table.scores[m][i])) for m in metrics},
            "strict": {m: _jsonable(float(e.table.strict[m][i])) for m in metrics if m in e.table.strict},
            "details": {m: _jsonable(e.table.details[m][i]) for m in metrics},
        })
    return out


def _jsonable(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts and lists too) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _columns(results: Results) -> list[tuple[str, str, bool]]:
    """(task, metric, strict) per table column, in plan order."""
    cols = []
    for task, metrics in results.plan.items():
        for metric in metrics:
            cols.append((task, metric, False))
            if any(results.get(m, task, metric).strict is not None for m in results.models):
                cols.append((task, metric, True))
    return cols


def format_stat(stat: Stat, expected_n: int, digits: int = 2) -> str:
    """``0.43 ± 0.05`` (plus ``(n=..)`` when fewer samples than expected were scored; ``–`` for none)."""
    if stat.n == 0:
        return "–"
    text = f"{stat.mean:.{digits}f}" + (f" ± {stat.half_width:.{digits}f}" if math.isfinite(stat.half_width) else "")
    return text + (f" (n={stat.n})" if stat.n < expected_n else "")


def markdown_table(results: Results, digits: int = 2) -> str:
    """Rows = models; columns = task metrics as ``mean ± half-width`` and the average over tasks; a caption."""
    cols = _columns(results)
    head = [f"{_label(task)}: {metric}{' strict' if strict else ''}" for task, metric, strict in cols] + ["average"]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for model in results.models:
        cells = []
        for task, metric, strict in cols:
            row = results.get(model, task, metric)
            stat = row.strict if strict else row.score
            cells.append(format_stat(stat, results.expected_n(task), digits) if stat is not None else "–")
        average = results.average(model)
        cells.append(f"{average:.{digits}f}" if math.isfinite(average) else "–")
        lines.append(f"| {model.replace('|', '/')} | " + " | ".join(cells) + " |")
    c = results.config
    counts = ", ".join(f"{_label(t)} {results.expected_n(t)}" for t in results.tasks)
    headline = ", ".join(f"{_label(t)}: {results.headline_label(t)}" for t in results.tasks)
    caption = (
        f"Mean ± half-width of the {c.confidence:.0%} Student-t interval over prompts (a prompt's score is the "
        f"mean of its images); a task whose prompts have categories (templates) shows the equal-weight mean of "
        f"its category means (GenEval-style) with the stratified interval. "
        f"n (samples per cell): {counts}; cells with fewer scored samples show their n. "
        f"'strict' = GenEval-style all-or-nothing accuracy. average = mean over tasks of each task's own metric "
        f"({headline}). Settings: ODE, {c.steps} steps, CFG {c.guidance_scale}, "
        f"seed {c.seed}, {c.images_per_prompt} image(s) per prompt, prompts '{results.prompt_set}', "
        f"metrics '{c.metrics}'."
    )
    return ("\n".join(lines) + "\n\n" + caption + "\n" + _paired_markdown(results, digits)
            + comparisons_markdown(results, digits))


def _diff_cell(stat: Stat | None, digits: int) -> str:
    if stat is None or stat.n == 0:
        return "–"
    if not math.isfinite(stat.half_width):
        return f"{stat.mean:+.{digits}f}"
    sig = abs(stat.mean) > stat.half_width
    return f"{stat.mean:+.{digits}f} ± {stat.half_width:.{digits}f}" + (" *" if sig else "")


def comparisons_markdown(results: Results, digits: int = 2) -> str:
    """The config's method-vs-method rows (:func:`compare`) as a Markdown section; '' when none is asked for."""
    comparisons = parse_comparisons(results.config.comparisons)
    if not comparisons:
        return ""
    head = [f"{_label(t)}: {results.headline_label(t)}" for t in results.tasks] + ["average"]
    lines = ["", "Method vs method (paired differences A - B, same prompts and noise):", "",
             "| A vs B | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for row in compare(results, comparisons):
        cells = [_diff_cell(row.by_task.get(t), digits) for t in results.tasks] + [_diff_cell(row.average, digits)]
        lines.append(f"| {str(row.comparison).replace('|', '/')} | " + " | ".join(cells) + " |")
    c = results.config
    lines += ["", f"Per task as above ({c.confidence:.0%} Student-t, stratified by category); average: the mean of "
              f"the task differences with half-width sqrt(sum h^2) / T (the tasks' prompts are disjoint); * = the "
              f"interval excludes 0.", ""]
    return "\n".join(lines)


def _paired_markdown(results: Results, digits: int) -> str:
    if len(results.models) < 2:
        return ""
    paired = paired_differences(results)
    ref = results.models[0]
    head = [f"{_label(t)}: {results.headline_label(t)}" for t in results.tasks]
    lines = ["", f"Paired differences to {ref.replace('|', '/')} (same prompts and noise):", "",
             "| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for model, tasks in paired.items():
        cells = []
        for t in results.tasks:
            st = tasks[t]
            if st.n == 0:
                cells.append("–")
                continue
            sig = math.isfinite(st.half_width) and abs(st.mean) > st.half_width
            cells.append(f"{st.mean:+.{digits}f} ± {st.half_width:.{digits}f}" + (" *" if sig else ""))
        lines.append(f"| {model.replace('|', '/')} | " + " | ".join(cells) + " |")
    c = results.config
    lines += ["", f"Mean over prompts of the per-sample difference, {c.confidence:.0%} Student-t interval (stratified "
              f"by category like the table above); * = the interval excludes 0.", ""]
    return "\n".join(lines)


def save_task_grid(results: Results, e: ModelEval, task: str, path: Path) -> Path:
    """The kept images of ``task`` for one model, captioned with prompt and task-metric score."""
    metric = results.task_metric(task)
    pos = [k for k, i in enumerate(e.image_index) if e.samples[i].task == task]
    rows = [e.image_index[k] for k in pos]
    captions = [f"{e.samples[i].text} | {metric} {float(e.table.scores[metric][i]):.2f}" for i in rows]
    stat = results.get(e.name, task, metric).score
    title = f"{e.name} / {_label(task)}: {metric} {format_stat(stat, results.expected_n(task))}"
    return save_grid(e.images[pos], path, captions=captions, title=title)


def save_chart(results: Results, path: Path) -> Path:
    """Grouped bars: each task's headline value per model with its confidence interval (Agg, no pyplot)."""
    tasks, models = list(results.tasks), list(results.models)
    fig = Figure(figsize=(3.0 + 0.5 * len(tasks) * len(models), 3.6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        heads = [results.get(model, t, results.task_metric(t)).headline for t in tasks]
        errors = [h.half_width if math.isfinite(h.half_width) else 0.0 for h in heads]
        ax.bar(np.arange(len(tasks)) + (j - (len(models) - 1) / 2) * width, [h.mean for h in heads], width,
               yerr=errors, capsize=3, label=model)
    ax.set_xticks(np.arange(len(tasks)), [f"{_label(t)}\n({results.headline_label(t)})" for t in tasks])
    ax.set_ylabel("task metric")
    ax.set_ylim(bottom=0.0)
    ax.set_title(f"{results.prompt_set}: mean ± {results.config.confidence:.0%} CI over prompts", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, format="png")
    return path


def _label(task: str) -> str:
    return task or "untagged"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", _label(text)).strip("-") or "untagged"
