"""Data-parallel pieces on 2 gloo processes: gathers of uneven shares, the sample-weighted gradient average of
one optimizer step (identical on both), a bad loss on one process skipping the step on both, log reduction,
and a whole data-parallel OPD run ending with the same LoRA and metrics on both processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from flowopd_core.training.distributed import World

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from types import SimpleNamespace
    import torch
    from flowopd_core.training.distributed import init_from_env, shutdown
    from flowopd_core.training.base import LoraTrainer

    world = init_from_env()
    r = world.rank
    out = {"size": world.size, "shares": list(world.shard(5))}
    sizes = world.shard_sizes(5, 2)  # 5 groups of 2 samples: process 0 holds 2 groups, process 1 holds 3
    local = torch.arange(sizes[r], dtype=torch.float32) + 100 * r
    out["gathered"] = world.all_gather_cat(local, sizes).tolist()
    out["any"] = [world.any(r == 1), world.any(False)]
    out["broadcast"] = world.broadcast_int(7 if r == 0 else -1)
    out["identical"] = [world.identical([torch.ones(3)]), world.identical([torch.full((3,), float(r))])]

    trainer = object.__new__(LoraTrainer)  # just the update machinery: one parameter, plain SGD with lr 1
    w = torch.nn.Parameter(torch.zeros(3))
    trainer.params, trainer.world, trainer.ema = {"w": w}, world, None
    trainer.config = SimpleNamespace(grad_clip=0, max_bad_steps=5, lr_schedule="constant")
    trainer.optimizer = torch.optim.SGD([w], lr=1.0)
    trainer.optimizer_steps = trainer.bad_streak = trainer.skipped_steps = trainer.epoch_index = 0

    w.grad = torch.full((3,), 1.0 if r == 0 else 5.0)  # process 0: mean over 3 samples; process 1: over 1
    out["norm"] = trainer._finish_update(3 if r == 0 else 1, "")
    out["after_step"] = w.detach().tolist()
    w.grad = torch.full((3,), 1.0)
    out["bad"] = trainer._finish_update(2, "GRPO loss nan" if r == 1 else "")
    out["after_bad"] = w.detach().tolist()
    w.grad = None
    out["empty"] = trainer._finish_update(0, "")
    out["counts"] = [trainer.optimizer_steps, trainer.skipped_steps, trainer.bad_streak]

    log = {"loss": [1.0, 2.0] if r == 0 else [6.0], "kl": [], "first_dev": 0.5 * r, "trained": 2 if r == 0 else 1}
    trainer._reduce_log(log, ("loss", "kl"), ("first_dev",), ("trained",))
    out["log"] = log

    # A whole data-parallel run: the OPD trainer (tiny pipeline, two teachers, MAR), 3 prompts over 2 processes
    from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool
    from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
    from flowopd_core.models.policy import BASE_ADAPTER, LoraSpec, Policy
    from flowopd_core.prompts import PromptSet, PromptSpec

    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(100 + seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=4.0, init=False))
    pool = TeacherPool(policy, {"compose": "t_compose", "text": "t_text"}, anchor=BASE_ADAPTER)
    prompts = PromptSet((PromptSpec("a red circle", task="compose"), PromptSpec("two blue squares", task="compose"),
                         PromptSpec('the word "AB"', task="text"), PromptSpec('the word "CD"', task="text")))
    config = OPDConfig(group_size=2, prompts_per_epoch=3, steps=3, batch_size=8, lora_rank=4, lora_alpha=8.0,
                       lr=3e-2, epochs=2, reward_workers=0, anchor_weight=0.5, updates_per_epoch=2)
    trainer = OPDTrainer(pipe, pool, "student", config, prompts)
    history = [m.to_json() for m in trainer.train()]
    out["opd"] = {k: [h[k] for h in history] for k in ("trained_samples", "optimizer_steps", "kl", "kl_by_task")}
    out["opd_identical"] = world.identical(list(trainer.params.values()))
    out["opd_moved"] = any(bool(p.abs().sum()) for n, p in trainer.params.items() if "lora_B" in n)
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as handle:
        json.dump(out, handle)
    shutdown()
    os._exit(0)  # as runner.py: gloo's teardown at interpreter exit sometimes aborts a finished process
    """
)


def test_single_process_world_is_the_identity():
    world = World()
    assert world.is_main and list(world.shard(5)) == [0, 1, 2, 3, 4] and world.shard_sizes(5, 2) == [10]
    assert world.any(True) and not world.any(False) and world.broadcast_int(3) == 3 and world.identical([])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_average_gradients_by_samples_and_skip_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["size"] == r1["size"] == 2 and r0["shares"] == [0, 1] and r1["shares"] == [2, 3, 4]
    assert r0["gathered"] == r1["gathered"] == [0, 1, 2, 3, 100, 101, 102, 103, 104, 105]
    assert r0["any"] == r1["any"] == [True, False] and r0["broadcast"] == r1["broadcast"] == 7
    assert r0["identical"] == r1["identical"] == [True, False]
    for out in (r0, r1):
        # (3 x 1 + 1 x 5) / 4 = 2 per element, one SGD step of lr 1
        assert out["after_step"] == [-2.0, -2.0, -2.0] and out["norm"] == pytest.approx(2 * 3**0.5)
        assert out["bad"] is None and out["after_bad"] == [-2.0, -2.0, -2.0]  # one bad process: both skip
        assert out["empty"] is None and out["counts"] == [1, 1, 1]  # no samples anywhere: no step, not bad
        assert out["log"] == {"loss": [3.0], "kl": [], "first_dev": 0.5, "trained": 3}
    # OPD: 3 groups of 2 split 1 + 2; every epoch trains all 6 samples in 2 steps; same metrics and LoRA on both
    assert r0["opd"] == r1["opd"] and r0["opd"]["trained_samples"] == [6, 6] and r0["opd"]["optimizer_steps"] == [2, 4]
    assert all(set(by_task) <= {"compose", "text"} and by_task for by_task in r0["opd"]["kl_by_task"])
    assert r0["opd_identical"] and r1["opd_identical"] and r0["opd_moved"]
