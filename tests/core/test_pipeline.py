"""Model layer: pipeline folders, text-embedding cache, batched CFG velocity, decode (tiny 16x16 SD3)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.miniworld.tasks import all_prompts
from flowopd_core.miniworld.tiny import (
    TEST_CONFIG,
    TinyConfig,
    build_tiny_pipeline,
    clip_tokenizer,
    miniworld_words,
    t5_tokenizer,
    word_merges,
)
from flowopd_core.models.pipeline import (
    TextEmbeddingCache,
    decode,
    encode_images,
    initial_noise,
    latent_shape,
    load_pipeline,
    velocity,
)

PROMPTS = ["a red circle", 'the word "CAT"', "two blue squares", "a red circle"]
T5_LEN = TEST_CONFIG.t5_max_length


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TEST_CONFIG, seed=0)


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    pipe.save_pretrained(path)
    return path


def test_tiny_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_pipeline(TEST_CONFIG, seed=3), build_tiny_pipeline(TEST_CONFIG, seed=3)
    c = build_tiny_pipeline(TEST_CONFIG, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = (p.transformer.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="patch_size"):
        TinyConfig(sample_size=18, patch_size=4)
    with pytest.raises(ValueError, match="text_dim"):
        TinyConfig(text_dim=32, clip_hidden=32)


def test_clip_tokenizer_builds_each_miniworld_word_as_one_piece():
    words = miniworld_words()
    tokenizer = clip_tokenizer(16, words)
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("a red triangle to the left of a green square").input_ids
    assert len(ids) == 12 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.tokenize("Red, CLEAN") == ["red</w>", ",</w>", "clean</w>"]  # lower-cased first
    # anything else falls back to characters (some merged): the text is still fully represented
    pieces = tokenizer.tokenize('the word "XQZW"')
    assert pieces[:3] == ["the</w>", "word</w>", '"</w>'] and "".join(pieces[3:]) == "xqzw</w>" + '"</w>'
    assert tokenizer.unk_token_id not in tokenizer("zebra quartz 42").input_ids[1:-1]  # unknown = end token
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(set(vocab.values())) == max(vocab.values()) + 1  # ids 0..n-1, no duplicates
    assert vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
    plain = clip_tokenizer(16)
    assert len(plain) == 514 and plain.tokenize("red") == ["r", "e", "d</w>"]


def test_word_merges_keep_earlier_words_whole_and_reject_non_letters():
    words = ("the", "three", "re", "red", "tree", "there", "he")
    merges = word_merges(words)
    assert len(set(merges)) == len(merges)
    for n in range(1, len(words) + 1):  # any prefix of the list: its merges keep all of its words whole
        tokenizer = clip_tokenizer(16, words[:n])
        assert all(tokenizer.tokenize(w) == [w + "</w>"] for w in words[:n])
    with pytest.raises(ValueError, match="letters"):
        word_merges(("red", "x-ray"))


def test_no_miniworld_prompt_is_truncated_by_the_default_tokenizers():
    pipe = build_tiny_pipeline(TinyConfig(num_layers=1, text_layers=1), seed=0)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        limit = tokenizer.model_max_length
        assert limit == 16
        for split in ("train", "test"):
            texts = [p.text for p in all_prompts(split)]
            lengths = [len(ids) for ids in tokenizer(texts).input_ids]  # untruncated, with start/end tokens
            longest = texts[lengths.index(max(lengths))]
            assert max(lengths) <= limit, (type(tokenizer).__name__, split, longest, max(lengths))
            assert tokenizer.unk_token_id not in {i for ids in tokenizer(texts).input_ids for i in ids[1:-1]}


def test_default_t5_length_holds_every_miniworld_prompt_with_word_pieces():
    config = TinyConfig()
    words = miniworld_words()
    assert {"red", "triangle", "left", "clean"} <= set(words)
    tokenizer = t5_tokenizer(config.t5_max_length, words)
    assert tokenizer.tokenize("a red triangle to the left of a green square")[:3] == ["▁a", "▁red", "▁triangle"]
    assert tokenizer.tokenize('the word "AC"')[-3:] == ["A", "C", '"']  # case kept, letters spelled out
    texts = [p.text for split in ("train", "test") for p in all_prompts(split)]
    assert max(len(ids) for ids in tokenizer(texts).input_ids) <= config.t5_max_length


def test_folder_loads_with_plain_diffusers_and_samples_offline(pipe, folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and index["vae"] == [None, None]
    assert list(folder.glob("transformer/*.safetensors")) and not list(folder.rglob("*.bin"))
    plain = StableDiffusion3Pipeline.from_pretrained(folder, vae=None, local_files_only=True, use_safetensors=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.5, output_type="latent", max_sequence_length=T5_LEN)
    a = plain(PROMPTS[:2], generator=torch.Generator().manual_seed(1), **kwargs).images
    b = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(1), height=16, width=16, **kwargs).images
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_load_pipeline_sets_pixel_space(pipe, folder):
    loaded = load_pipeline(folder)
    assert loaded.vae is None and loaded.vae_scale_factor == 1
    assert not loaded.transformer.training
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, loaded.transformer.state_dict()[key]), key
    assert latent_shape(loaded, 5) == (5, 3, 16, 16)
    images = loaded(["a red circle"], num_inference_steps=2, output_type="latent", max_sequence_length=T5_LEN).images
    assert images.shape == (1, 3, 16, 16)


def test_half_precision_model_gives_float32_velocity(pipe, folder):
    half = load_pipeline(folder, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    cache = TextEmbeddingCache(half)
    cond = cache.encode(PROMPTS[:2])
    assert cond.prompt_embeds.dtype == torch.bfloat16
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_half = velocity(half.transformer, x, 0.7, cond, cache.negative(), guidance_scale=4.5)
        v_full = velocity(pipe.transformer, x, 0.7, TextEmbeddingCache(pipe).encode(PROMPTS[:2]),
                          TextEmbeddingCache(pipe).negative(), guidance_scale=4.5)
    assert v_half.dtype == torch.float32
    assert (v_half - v_full).abs().mean() < 0.1 * v_full.abs().mean()


def test_load_pipeline_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_pipeline(missing)


def test_load_pipeline_refuses_weights_that_are_not_safetensors(pipe, tmp_path):
    """A transformer whose weights are only in the legacy .bin format is refused, never deserialised: the .bin
    here holds bytes that no deserialiser could read, so reaching it would raise something else."""
    pipe.save_pretrained(tmp_path / "bin")
    transformer = tmp_path / "bin" / "transformer"
    for weights in transformer.glob("*.safetensors"):
        weights.unlink()
    (transformer / "diffusion_pytorch_model.bin").write_bytes(b"not a weights file")
    with pytest.raises(Exception, match="safetensors"):
        load_pipeline(tmp_path / "bin")


def test_latent_shape_and_noise(pipe):
    assert latent_shape(pipe, 2) == (2, 3, 16, 16)
    assert latent_shape(pipe, 2, height=32, width=8) == (2, 3, 32, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        latent_shape(pipe, 2, height=18)
    a = initial_noise(pipe, 3, generator=torch.Generator().manual_seed(0))
    b = initial_noise(pipe, 3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)


def test_cached_embeddings_equal_fresh_ones(pipe):
    cache = TextEmbeddingCache(pipe)
    assert cache.max_sequence_length == T5_LEN  # the tiny T5 tokenizer's model_max_length
    got = cache.encode(PROMPTS)
    assert (
        got.prompt_embeds.shape == (4, TEST_CONFIG.clip_max_length + T5_LEN, TEST_CONFIG.text_dim)
        and got.pooled.shape == (4, 64)
    )
    neg = cache.negative(3)
    assert len(neg) == 3
    for i, prompt in enumerate(PROMPTS):
        # fresh = the pipeline's own encoding of that prompt (and of the negative prompt ""), no autograd
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                [prompt], None, None, do_classifier_free_guidance=True, max_sequence_length=T5_LEN
            )
        assert torch.equal(got.prompt_embeds[i], embeds[0]) and torch.equal(got.pooled[i], pooled[0])
        assert torch.equal(neg.prompt_embeds[i % 3], neg_embeds[0]) and torch.equal(neg.pooled[i % 3], neg_pooled[0])
    assert not torch.equal(got.pooled[0], got.pooled[1])
    # served from the cache afterwards, in any order, even with the encoders gone
    assert len(cache) == len(set(PROMPTS)) + 1
    cache.close()
    again = cache.encode(PROMPTS[::-1])
    assert torch.equal(again.prompt_embeds, got.prompt_embeds.flip(0))
    with pytest.raises(KeyError, match="closed"):
        cache.encode(["a prompt never seen"])
    with pytest.raises(TypeError):
        cache.encode("a red circle")


def _forward(transformer, x, t, embeds, pooled):
    return transformer(
        hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
    )[0]


def test_batched_cfg_equals_two_separate_forwards(pipe):
    cache = TextEmbeddingCache(pipe)
    cond, uncond = cache.encode(PROMPTS[:3]), cache.negative()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        v = velocity(pipe.transformer, x, t, cond, uncond, guidance_scale=4.5)
        v_c = _forward(pipe.transformer, x, t, cond.prompt_embeds, cond.pooled)
        neg = uncond.expand(3)
        v_u = _forward(pipe.transformer, x, t, neg.prompt_embeds, neg.pooled)
        v_1 = velocity(pipe.transformer, x, t, cond)
        v_scalar_t = velocity(pipe.transformer, x, 0.5, cond)
        v_c_half = _forward(pipe.transformer, x, torch.full((3,), 0.5), cond.prompt_embeds, cond.pooled)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=0)
    assert not torch.allclose(v, v_c, atol=1e-3)
    assert torch.equal(v_1, v_c)
    assert torch.equal(v_scalar_t, v_c_half)
    with pytest.raises(ValueError, match="uncond"):
        velocity(pipe.transformer, x, t, cond, guidance_scale=2.0)


def test_velocity_reproduces_the_diffusers_pipeline_sampler(pipe):
    """Euler steps with our velocity (timestep = 1000 t, CFG order) give the pipeline's own result."""
    steps, w = 3, 3.0
    x = initial_noise(pipe, 2, generator=torch.Generator().manual_seed(5))
    expected = pipe(
        PROMPTS[:2], num_inference_steps=steps, guidance_scale=w, latents=x.clone(), height=16, width=16,
        output_type="latent", max_sequence_length=T5_LEN,
    ).images
    cache = TextEmbeddingCache(pipe)
    cond, uncond = cache.encode(PROMPTS[:2]), cache.negative()
    sigmas = pipe.scheduler.sigmas  # set by the pipeline call above: steps + 1 values ending at 0
    assert len(sigmas) == steps + 1
    with torch.no_grad():
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (t_next - t) * velocity(pipe.transformer, x, float(t), cond, uncond, guidance_scale=w)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_pixel_space_decode_and_encode_are_inverse(pipe):
    images = torch.rand(2, 3, 16, 16)
    latents = encode_images(pipe, images)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(decode(pipe, latents), images)
    assert decode(pipe, torch.full((1, 3, 2, 2), 3.0)).max() == 1.0


def test_vae_decode_matches_the_pipeline_postprocessing(tmp_path):
    config = TinyConfig(sample_size=8, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=16,
                        vae_latent_channels=4)
    vae_pipe = build_tiny_pipeline(config, seed=0)
    vae_pipe.vae.register_to_config(scaling_factor=1.5, shift_factor=0.25)  # non-trivial factors
    vae_pipe.save_pretrained(tmp_path / "vae_pipe")
    loaded = load_pipeline(tmp_path / "vae_pipe")
    assert loaded.vae_scale_factor == 2 and loaded.vae.config.shift_factor == 0.25
    kwargs = dict(num_inference_steps=2, max_sequence_length=T5_LEN, height=16, width=16)
    latents = loaded(["a"], generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    images = loaded(["a"], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    assert latents.shape == (1, 4, 8, 8)
    with torch.no_grad():
        ours = decode(loaded, latents)
    assert ours.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, images, atol=1e-6, rtol=0)
    with torch.no_grad():
        z = encode_images(loaded, ours, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)


def test_a_folder_naming_another_library_is_refused_before_loading(miniworld_with_index):
    """diffusers imports the module a model_index.json entry names: a folder naming any library but diffusers and
    transformers is refused, naming the component, before diffusers reads it."""
    import sys

    from flowopd_core.models.pipeline import load_pipeline

    folder = miniworld_with_index({"scheduler": ["flowopd_never_imported_module", "FlowMatchEulerDiscreteScheduler"]})
    with pytest.raises(ValueError, match="component scheduler names the library 'flowopd_never_imported_module'"):
        load_pipeline(folder)
    assert "flowopd_never_imported_module" not in sys.modules
