"""Validating, listing, exporting and importing graphs imports none of the heavy libraries (issue 18): the nodes
declare their ports from torch-free modules and import trainers, pipelines and rewards only when they run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "numpy", "scipy", "matplotlib")


def _heavy_after(code: str) -> list[str]:
    script = code + (
        "\nimport sys\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def test_validate_and_list_nodes_import_no_heavy_library():
    code = (
        "from flowopd_nodes.cli import main\n"
        "assert main(['validate', 'graphs/full_opd.yaml']) == 0\n"
        "assert main(['list-nodes']) == 0\n"
        "assert main(['list-nodes', '--json']) == 0\n"
    )
    assert _heavy_after(code) == []


def test_export_and_import_import_no_heavy_library(tmp_path):
    api, workflow, back = tmp_path / "api.json", tmp_path / "workflow.json", tmp_path / "back.yaml"
    code = (
        "from flowopd_nodes.cli import main\n"
        f"assert main(['export', 'graphs/full_opd.yaml', '--comfy-api', {str(api)!r}, "
        f"'--comfy-workflow', {str(workflow)!r}]) == 0\n"
        f"assert main(['import', {str(workflow)!r}, '-o', {str(back)!r}, '--no-file-check']) == 0\n"
    )
    assert _heavy_after(code) == []


def test_light_modules_name_what_the_heavy_ones_define():
    """The torch-free name lists equal what the implementing modules use (checked here, where torch may load)."""
    from flowopd_core import choices
    from flowopd_core.distill import coldstart, loss
    from flowopd_core.eval import evaluate
    from flowopd_core.grpo import loss as grpo_loss
    from flowopd_core.models import merge, modelref, pipeline
    from flowopd_core.sampling import samplers

    assert tuple(modelref.DTYPES) == choices.DTYPE_NAMES
    assert modelref.DEVICES is choices.DEVICES
    assert pipeline.PRECISIONS is choices.PRECISIONS and pipeline.MAX_T5_LENGTH == choices.MAX_T5_LENGTH
    assert samplers.SAMPLER_KINDS is choices.SAMPLER_KINDS and samplers.STOCHASTIC_KINDS is choices.STOCHASTIC_KINDS
    assert grpo_loss.KL_FORMS is choices.KL_FORMS and grpo_loss.REWARD_MODES is choices.REWARD_MODES
    assert loss.ROUTE_MODES is choices.ROUTE_MODES and loss.DISTILL_MODES is choices.DISTILL_MODES
    assert merge.MERGE_METHODS is choices.MERGE_METHODS and coldstart.COLD_STARTS is choices.COLD_STARTS
    assert evaluate.METRIC_MODES is choices.METRIC_MODES


def test_reward_names_equal_the_registries():
    from flowopd_core.rewards import names
    from flowopd_core.rewards.registry import CONTROL_REWARDS, REAL_REWARDS, REWARDS, TASK_REWARDS

    assert names.REWARD_NAMES == tuple(REWARDS)
    assert names.REAL_REWARD_NAMES == tuple(REAL_REWARDS)
    assert names.CONTROL_REWARD_NAMES == tuple(CONTROL_REWARDS)
    assert names.TASK_REWARDS == TASK_REWARDS
    assert set(TASK_REWARDS.values()) <= set(REWARDS)


def test_old_import_paths_still_work():
    from flowopd_core.distill.coldstart import SFTConfig
    from flowopd_core.distill.trainer import OPDConfig
    from flowopd_core.eval.evaluate import EvalConfig
    from flowopd_core.grpo.trainer import GRPOConfig, parse_window_range
    from flowopd_core.miniworld import TEXT_JITTER, parse_task_weights, parse_text_jitter, sample_training_batch
    from flowopd_core.miniworld.rendering import TEXT_JITTER as RENDER_JITTER
    from flowopd_core.miniworld.tiny import TinyConfig
    from flowopd_core.rewards import REWARDS, Reward, make_reward
    from flowopd_core.training.pretrain import PretrainConfig

    assert RENDER_JITTER == TEXT_JITTER and callable(sample_training_batch)
    assert parse_task_weights("compose:1") == {"compose": 1.0} and parse_text_jitter("1, 2") == (1.0, 2.0)
    assert parse_window_range("1, 3") == (1, 3)
    assert all(issubclass(cls, Reward) for cls in REWARDS.values()) and callable(make_reward)
    for config in (SFTConfig, OPDConfig, EvalConfig, GRPOConfig, TinyConfig, PretrainConfig):
        config()
