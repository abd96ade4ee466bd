"""Rectified-flow pretraining on the tiny 16x16 SD3 pipeline with a small synthetic data set."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.pipeline import TextEmbeddingCache, encode_images, load_pipeline, velocity
from flowopd_core.training.pretrain import PretrainConfig, flow_matching_loss, pretrain, sample_times, snapshot_dir

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


@dataclass
class Batch:
    prompts: list[str]
    images: torch.Tensor


def colour_squares(rng: np.random.Generator, batch_size: int, size: int) -> Batch:
    """A centred square of a named colour on white; the prompt names the colour."""
    names = rng.choice(list(COLOURS), size=batch_size)
    images = torch.ones(batch_size, 3, size, size)
    lo, hi = size // 4, 3 * size // 4
    for i, name in enumerate(names):
        images[i, :, lo:hi, lo:hi] = torch.tensor(COLOURS[name]).view(3, 1, 1)
    return Batch([f"a {name} square" for name in names], images)


def fixed_batch(rng: np.random.Generator, batch_size: int, size: int) -> Batch:
    return colour_squares(np.random.default_rng(0), batch_size, size)


def _fast(**overrides) -> PretrainConfig:
    base = dict(steps=5, batch_size=8, lr=1e-3, warmup_steps=2, image_size=16, log_every=2, seed=1)
    return PretrainConfig(**{**base, **overrides})


def test_config_checks():
    assert PretrainConfig().batch_size == 32 and PretrainConfig().ema_decay == 0.995
    for bad in (dict(steps=0), dict(lr=0.0), dict(ema_decay=1.0), dict(cfg_dropout=1.0), dict(logit_std=0.0)):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)


def test_sample_times_are_logit_normal():
    t = sample_times(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    logits = torch.logit(t)
    assert abs(logits.std().item() - 1.0) < 0.03


def test_pretraining_lowers_the_loss_on_a_fixed_batch(tmp_path):
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    batch = fixed_batch(None, 8, 16)
    cache = TextEmbeddingCache(pipe)
    g = torch.Generator().manual_seed(123)
    x0, cond = encode_images(pipe, batch.images), cache.encode(batch.prompts)
    t, eps = sample_times(64, 0.0, 1.0, g), torch.randn(64, 3, 16, 16, generator=g)
    x0, cond = x0.repeat(8, 1, 1, 1), type(cond)(cond.prompt_embeds.repeat(8, 1, 1), cond.pooled.repeat(8, 1))

    def held_out_loss(transformer):
        with torch.no_grad():
            return flow_matching_loss(transformer, x0, cond, t, eps).item()

    before = held_out_loss(pipe.transformer)
    calls = []
    result = pretrain(pipe, fixed_batch, _fast(steps=40, ema_decay=0.0), tmp_path, progress=lambda *a: calls.append(a))
    after = held_out_loss(pipe.transformer)
    assert after < 0.8 * before, (before, after)
    assert result.steps == 40 and len(result.losses) == 40 and all(np.isfinite(result.losses))
    assert calls[0] == (2, 40, result.losses[1]) and calls[-1][0] == 40 and len(calls) == 20


def test_pretraining_is_deterministic_and_writes_a_pipeline_folder(tmp_path):
    results = []
    for run in ("a", "b"):
        pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
        initial = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        results.append(pretrain(pipe, colour_squares, _fast(), tmp_path / run))
    a, b = (load_pipeline(r.path).transformer.state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0].losses == results[1].losses
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it did train

    out = tmp_path / "a"
    assert results[0].path == out / "pipeline" and (out / "pipeline" / "model_index.json").is_file()
    assert list((out / "pipeline" / "transformer").glob("*.safetensors"))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 5 and record["config"]["seed"] == 1 and record["losses"] == results[0].losses

    other_seed = pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, _fast(seed=2), tmp_path / "c")
    assert other_seed.losses != results[0].losses


def test_saved_weights_are_the_ema(tmp_path):
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    raw = {}
    config = _fast(steps=6, ema_decay=0.5)

    def spy(step, total, loss):
        if step == total:
            raw.update({k: v.clone() for k, v in pipe.transformer.state_dict().items()})

    result = pretrain(pipe, colour_squares, config, tmp_path, progress=spy)
    saved = load_pipeline(result.path).transformer.state_dict()
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # EMA differs from the raw last weights


def test_wrong_image_size_is_reported(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, _fast(image_size=8), tmp_path)


def test_snapshots_save_the_ema_weights_and_leave_the_run_unchanged(tmp_path):
    config = _fast(steps=7, ema_decay=0.5, lr_schedule="constant")
    plain = pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, config, tmp_path / "plain")
    snap = pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares,
                    dataclasses.replace(config, snapshot_every=3), tmp_path / "snap")
    assert snap.losses == plain.losses  # saving snapshots does not perturb training
    final = load_pipeline(snap.path).transformer.state_dict()
    reference = load_pipeline(plain.path).transformer.state_dict()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    assert sorted(snap.snapshots) == [3, 6] and snap.snapshots[3] == snapshot_dir(tmp_path / "snap", 3)
    assert snap.snapshots[3].name == "step_00003" and (snap.snapshots[3] / "model_index.json").is_file()
    assert json.loads((tmp_path / "snap" / "pretrain.json").read_text())["snapshots"] == [3, 6]
    # the step-3 snapshot holds the EMA weights of the same run stopped after 3 steps (constant schedule)
    short = pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, dataclasses.replace(config, steps=3),
                     tmp_path / "short")
    three, stopped = (load_pipeline(p).transformer.state_dict() for p in (snap.snapshots[3], short.path))
    assert all(torch.equal(three[k], stopped[k]) for k in three)
    assert any(not torch.equal(three[k], final[k]) for k in three)
    with pytest.raises(ValueError, match="snapshot_every"):
        PretrainConfig(snapshot_every=-1)


def test_config_refuses_a_negative_or_nan_binding_weight():
    assert PretrainConfig().binding_weight == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="binding_weight"):
            PretrainConfig(binding_weight=bad)


def test_weighted_loss_is_the_weighted_mean_of_the_squared_errors():
    """weights None or all equal: the plain mean; a 0/1 mask: the mean over the masked positions only."""
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    batch = colour_squares(np.random.default_rng(0), 4, 16)
    g = torch.Generator().manual_seed(0)
    x0, cond = encode_images(pipe, batch.images), TextEmbeddingCache(pipe).encode(batch.prompts)
    t, eps = sample_times(4, 0.0, 1.0, g), torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        plain = flow_matching_loss(pipe.transformer, x0, cond, t, eps)
        same = flow_matching_loss(pipe.transformer, x0, cond, t, eps, weights=torch.full((4, 1, 16, 16), 3.0))
        torch.testing.assert_close(same, plain, rtol=1e-6, atol=0)
        mask = torch.zeros(4, 1, 16, 16)
        mask[1, :, 2:5, 7:11] = 1.0
        masked = flow_matching_loss(pipe.transformer, x0, cond, t, eps, weights=mask)
        tt = t.view(-1, 1, 1, 1)
        error = (velocity(pipe.transformer, (1 - tt) * x0 + tt * eps, t, cond) - (eps - x0)) ** 2
        torch.testing.assert_close(masked, error[1, :, 2:5, 7:11].mean(), rtol=1e-5, atol=0)


@dataclass
class BoundBatch:
    prompts: list[str]
    images: torch.Tensor
    binding: torch.Tensor


def squares_with_binding(rng: np.random.Generator, batch_size: int, size: int) -> BoundBatch:
    batch = colour_squares(rng, batch_size, size)
    mask = torch.zeros(batch_size, 1, size, size)
    mask[:, :, size // 4, :] = 1.0  # the squares' top edge row
    return BoundBatch(batch.prompts, batch.images, mask)


def test_binding_weight_changes_training_and_needs_binding_masks(tmp_path):
    """binding_weight > 0 reweights the loss on the batches' binding pixels (the same data and seed train other
    weights than the plain loss); data without a binding mask are refused rather than trained unweighted."""
    runs = {w: pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), squares_with_binding,
                        _fast(binding_weight=w, ema_decay=0.0), tmp_path / str(w)) for w in (0.0, 20.0)}
    plain = pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, _fast(ema_decay=0.0), tmp_path / "p")
    assert runs[0.0].losses == plain.losses  # weight 0: a mask in the batch changes nothing
    assert runs[20.0].losses != runs[0.0].losses and all(np.isfinite(runs[20.0].losses))
    with pytest.raises(ValueError, match="binding"):
        pretrain(build_tiny_pipeline(TEST_CONFIG, seed=0), colour_squares, _fast(binding_weight=1.0), tmp_path / "x")


def test_binding_weights_follow_the_latent_size():
    """1 + w on the binding pixels; a mask at pixel size is max-pooled to a smaller latent (a VAE's x2)."""
    from flowopd_core.training.pretrain import binding_weights

    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 3, 5] = 1.0
    batch = BoundBatch(["a", "b"], torch.ones(2, 3, 8, 8), mask)
    assert binding_weights(batch, 0.0, 8) is None
    same = binding_weights(batch, 4.0, 8)
    assert same.shape == (2, 1, 8, 8) and same[0, 0, 3, 5] == 5.0 and same.sum() == 2 * 64 + 4.0
    half = binding_weights(batch, 4.0, 4)
    assert half.shape == (2, 1, 4, 4) and half[0, 0, 1, 2] == 5.0 and half.sum() == 2 * 16 + 4.0
