"""Real-model reward adapters: local weights only, a clear error naming a missing folder, and the PickScore code
path run end to end on a tiny random CLIP saved offline (no real weights exist on this machine)."""

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from flowopd_core.miniworld.sets import prompt_set, render_set
from flowopd_core.miniworld.tiny import clip_tokenizer
from flowopd_core.rewards.base import images_to_uint8
from flowopd_core.rewards.client import RemoteReward
from flowopd_core.rewards.real import REAL_REWARDS, PickScoreConfig, PickScoreReward
from flowopd_core.rewards.server import build_reward, start_server


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel and its processor, saved as two local folders like PickScore's; plus the originals."""
    tokenizer = clip_tokenizer(77)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    root = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "processor")
    return {"model_path": str(root / "model"), "processor_path": str(root / "processor")}, model, processor


def reference_pickscore(model, processor, images, texts):
    """PickScore by hand on the in-memory model: logit_scale.exp() * cos(projected image, projected text)."""
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        return model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_registry_and_missing_weights_fail_clearly(tmp_path):
    assert REAL_REWARDS == {"pickscore": PickScoreReward}
    with pytest.raises(ValueError, match="model_path is required"):
        build_reward("pickscore")
    missing = tmp_path / "no" / "PickScore_v1"
    with pytest.raises(FileNotFoundError, match=f"PickScore model_path: local folder '{missing}' does not exist"):
        PickScoreReward(PickScoreConfig(model_path=str(missing)))
    with pytest.raises(FileNotFoundError, match=f"processor_path: local folder '{missing}'"):
        PickScoreReward(PickScoreConfig(model_path=str(tmp_path), processor_path=str(missing)))
    with pytest.raises(ValueError, match="dtype"):
        PickScoreConfig(model_path=str(tmp_path), dtype="float8")


def test_pickscore_loads_local_folders_and_scores_like_pickscore(tiny_clip):
    paths, model, processor = tiny_clip
    prompts = list(prompt_set("compose", "test", per_task=6))
    images = render_set(prompt_set("compose", "test", per_task=6))
    images[3] = float("nan")
    reward = PickScoreReward(PickScoreConfig(**paths, batch_size=4))  # two forwards for the five valid images
    result = reward(images, prompts)
    valid = [0, 1, 2, 4, 5]
    expected = reference_pickscore(model, processor, images_to_uint8(images[valid]), [prompts[i].text for i in valid])
    torch.testing.assert_close(result.scores[valid], expected / 26.0, rtol=1e-5, atol=1e-6)
    assert torch.isnan(result.scores[3]) and result.strict is None
    assert result.details[0]["pickscore"] == pytest.approx(float(expected[0]), abs=1e-4)
    assert len(set(result.scores[valid].tolist())) == len(valid)


def test_pickscore_served_equals_in_process(tiny_clip):
    paths, _, _ = tiny_clip
    prompts = list(prompt_set("text", "test", per_task=5))
    images = render_set(prompt_set("text", "test", per_task=5))
    local = build_reward("pickscore", paths)(images, prompts)
    with start_server("pickscore", config=paths) as handle:  # one request: the same forwards as in process
        remote = RemoteReward(handle.url, name="pickscore", timeout=10, retries=0)(images, prompts)
    assert torch.equal(remote.scores, local.scores) and remote.details == local.details and remote.strict is None
