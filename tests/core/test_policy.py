"""Policy: named LoRA adapters on one frozen SD3 transformer via peft (tiny 16x16 model)."""

from __future__ import annotations

import json

import pytest
import torch

from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.pipeline import TextEmbeddingCache, velocity
from flowopd_core.models.policy import ATTENTION_TARGETS, BASE_ADAPTER, LoraSpec, Policy

RANDOM = LoraSpec(rank=4, alpha=8.0, init=False)  # random A and B: the adapter changes the output


@pytest.fixture(scope="module")
def conditioning():
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    cache = TextEmbeddingCache(pipe)
    return cache.encode(["a red circle", "two blue squares", 'the word "CAT"']), cache.negative()


@pytest.fixture
def base():
    return build_tiny_pipeline(TEST_CONFIG, seed=0).transformer


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.rand(batch, generator=g)


def _v(model, conditioning, x, t, **kwargs):
    cond, uncond = conditioning
    with torch.no_grad():
        return velocity(model, x, t, cond, uncond, guidance_scale=4.5, **kwargs)


def test_lora_spec_defaults_and_checks():
    spec = LoraSpec()
    assert (spec.rank, spec.alpha, spec.targets) == (32, 64.0, ATTENTION_TARGETS)
    peft_config = spec.to_peft()
    assert peft_config.r == 32 and peft_config.lora_alpha == 64.0 and set(peft_config.target_modules) == set(
        ATTENTION_TARGETS
    )
    for bad in (dict(rank=0), dict(alpha=0.0), dict(targets=())):
        with pytest.raises(ValueError):
            LoraSpec(**bad)


def test_default_targets_cover_every_attention_projection(base):
    policy = Policy(base)
    policy.add_adapter("student")
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in policy.model.named_parameters() if ".lora_A." in name}
    layers = TEST_CONFIG.num_layers
    # the last block is context_pre_only: it has no to_add_out, and its add_q_proj is dead (dead_targets)
    assert len(wrapped) == 8 * layers - 2
    assert f"base_model.model.transformer_blocks.{layers - 1}.attn.add_q_proj" not in wrapped
    assert all(name.endswith(ATTENTION_TARGETS) for name in wrapped)


def test_zero_init_adapter_and_disable_reproduce_the_base_exactly(base, conditioning):
    x, t = _inputs()
    expected = _v(base, conditioning, x, t)
    policy = Policy(base)
    policy.add_adapter("zero", LoraSpec(rank=4))  # B = 0: starts as the base
    assert torch.equal(_v(policy, conditioning, x, t), expected)
    policy.add_adapter("random", RANDOM)
    policy.set_active("random")
    assert not torch.allclose(_v(policy, conditioning, x, t), expected, atol=1e-4)
    with policy.disable():
        assert torch.equal(_v(policy, conditioning, x, t), expected)
    assert not torch.allclose(_v(policy, conditioning, x, t), expected, atol=1e-4)  # re-enabled afterwards


def test_save_load_round_trip_is_exact(tmp_path, conditioning):
    x, t = _inputs()
    policy = Policy(build_tiny_pipeline(TEST_CONFIG, seed=0).transformer)
    policy.add_adapter("teacher", RANDOM)
    expected = _v(policy, conditioning, x, t)
    folder = policy.save_adapter("teacher", tmp_path / "teacher")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    fresh = Policy(build_tiny_pipeline(TEST_CONFIG, seed=0).transformer)
    fresh.load_adapter("ocr", folder)  # first adapter: becomes active
    assert fresh.adapters == ("ocr",) and fresh.active == "ocr"
    assert torch.equal(_v(fresh, conditioning, x, t), expected)
    # as a second adapter next to another one
    other = Policy(build_tiny_pipeline(TEST_CONFIG, seed=0).transformer)
    other.add_adapter("student", LoraSpec(rank=8))
    other.load_adapter("teacher", folder)
    other.set_active("teacher")
    assert torch.equal(_v(other, conditioning, x, t), expected)
    with pytest.raises(FileNotFoundError, match="missing_adapter"):
        other.load_adapter("t2", tmp_path / "missing_adapter")


def test_per_sample_adapter_names_match_per_adapter_forwards(base, conditioning):
    x, t = _inputs()
    policy = Policy(base)
    policy.add_adapter("t1", RANDOM)
    policy.add_adapter("t2", LoraSpec(rank=2, alpha=2.0, init=False))
    separate = []
    for i, name in enumerate(["t2", BASE_ADAPTER, "t1"]):
        cond, uncond = conditioning
        one = (type(cond)(cond.prompt_embeds[i : i + 1], cond.pooled[i : i + 1]), uncond)
        if name == BASE_ADAPTER:
            with policy.disable():
                separate.append(_v(policy, one, x[i : i + 1], t[i : i + 1]))
        else:
            policy.set_active(name)
            separate.append(_v(policy, one, x[i : i + 1], t[i : i + 1]))
    mixed = _v(policy, conditioning, x, t, adapter_names=["t2", BASE_ADAPTER, "t1"])
    torch.testing.assert_close(mixed, torch.cat(separate), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adapter_names"):
        _v(policy, conditioning, x, t, adapter_names=["t1"])


def test_only_the_chosen_lora_is_trainable_and_survives_switching(base, conditioning):
    policy = Policy(base)
    policy.add_adapter("student", RANDOM)
    assert not any(p.requires_grad for p in policy.parameters())  # nothing trainable until asked
    policy.add_adapter("teacher", RANDOM)
    params = policy.trainable_parameters("student")
    names = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert names == set(policy.adapter_parameters("student")) and all(".student." in n for n in names)
    assert len(params) == 2 * (8 * TEST_CONFIG.num_layers - 2)

    policy.set_active("teacher")  # peft's set_adapter would freeze the student here
    policy.set_active("student")
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == names
    assert not policy.model.training

    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, t = _inputs()
    cond, _ = conditioning
    # a mixed batch with a frozen teacher row still trains the student (eval mode, as peft requires)
    loss = velocity(policy, x, t, cond, adapter_names=["student", "teacher", "student"]).square().mean()
    loss.backward()
    assert all(p.grad is None for n, p in policy.model.named_parameters() if n not in names)
    optimizer.step()
    unchanged = {n for (n, p), a in zip(policy.adapter_parameters("student").items(), before) if torch.equal(a, p)}
    # every student weight trains: the dead target (the last, context_pre_only block's add_q_proj) has no LoRA
    assert unchanged == set()
    last = TEST_CONFIG.num_layers - 1
    assert not any(f"transformer_blocks.{last}.attn.add_q_proj" in n for n in policy.adapter_parameters("student"))


def test_adapter_names_are_checked(base):
    policy = Policy(base)
    policy.add_adapter("student", RANDOM)
    for bad in ("student", BASE_ADAPTER, "a.b", ""):
        with pytest.raises(ValueError):
            policy.add_adapter(bad, RANDOM)
    with pytest.raises(KeyError, match="nope"):
        policy.set_active("nope")
