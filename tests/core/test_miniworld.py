"""Mini-world: prompts, splits, rendering, degradations and training batches."""

import itertools

import numpy as np
import pytest
import torch

from flowopd_core import miniworld as mw
from flowopd_core.miniworld.rendering import layout_pair, word_slack
from flowopd_core.rewards.compose import ComposeConfig, detect_objects, relation_holds


@pytest.mark.parametrize("task", mw.TASKS)
def test_splits_are_disjoint_fixed_and_complete(task):
    train, test = mw.prompts(task, "train"), mw.prompts(task, "test")
    assert train and test
    assert not {p.text for p in train} & {p.text for p in test}
    assert not {p.id for p in train} & {p.id for p in test}
    assert len({p.id for p in train + test}) == len(train + test)
    assert all(p.task == task for p in train + test)
    assert [p.id for p in mw.prompts(task, "train")] == [p.id for p in train]  # fixed order


def test_split_sizes_follow_the_rule():
    sizes = {t: (len(mw.prompts(t, "train")), len(mw.prompts(t, "test"))) for t in mw.TASKS}
    assert sizes == {"compose": (1272, 288), "text": (208, 89), "quality": (150, 50)}
    per_template = {(t, k): len(mw.template_prompts(t, k, "test")) for t in mw.TASKS for k in mw.TEMPLATES[t]}
    assert per_template == {("compose", "single"): 30, ("compose", "count"): 30, ("compose", "pair"): 40,
                            ("compose", "position"): 188, ("text", "word2"): 28, ("text", "word3"): 61,
                            ("quality", "icon"): 10, ("quality", "pair"): 40}
    assert mw.all_prompts("test") == [p for t in mw.TASKS for p in mw.prompts(t, "test")]
    assert not {p.text for p in mw.all_prompts("train")} & {p.text for p in mw.all_prompts("test")}


def test_test_prompts_recombine_attributes_seen_in_training():
    for template, patterns in mw.WORD_PATTERNS.items():
        train, test = mw.template_prompts("text", template, "train"), mw.template_prompts("text", template, "test")
        assert all(p.text == f'the word "{p.spec["word"]}"' for p in train + test)
        words = set()
        for pattern in patterns:
            alphabets = [mw.CONSONANTS if kind == "c" else mw.VOWELS for kind in pattern]
            words |= {"".join(w) for w in itertools.product(*alphabets)}
            ours = [p for p in train if all(c in a for c, a in zip(p.spec["word"], alphabets))
                    and len(p.spec["word"]) == len(pattern)]
            seen = {(pos, p.spec["word"][pos]) for p in ours for pos in range(len(pattern))}
            assert seen == {(pos, c) for pos, alphabet in enumerate(alphabets) for c in alphabet}  # all trained
        assert {p.spec["word"] for p in train + test} == words
    assert set(mw.LETTERS) == set(mw.CONSONANTS + mw.VOWELS) and len(mw.LETTERS) == 12
    single = {(o["colour"], o["shape"], o.get("size")) for p in mw.template_prompts("compose", "single", "train")
              for o in p.spec["objects"]}
    assert {c for c, _, _ in single} == set(mw.COLOURS) and {s for _, s, _ in single} == set(mw.SHAPES)
    pairs = [p for split in mw.SPLITS for p in mw.template_prompts("compose", "pair", split)]
    assert all(p.spec["objects"][0]["colour"] != p.spec["objects"][1]["colour"] and " and " in p.text for p in pairs)

    def triples(split):
        return {(o["colour"], o["shape"], o["count"]) for p in mw.template_prompts("compose", "count", split)
                for o in p.spec["objects"]}

    held = triples("test")
    seen_pairs = {pair for c, s, n in triples("train") for pair in [("cs", c, s), ("cn", c, n), ("sn", s, n)]}
    assert held and not held & triples("train")
    assert all({("cs", c, s), ("cn", c, n), ("sn", s, n)} <= seen_pairs for c, s, n in held)


def test_unknown_task_or_split_raises():
    with pytest.raises(ValueError, match="task"):
        mw.prompts("painting", "train")
    with pytest.raises(ValueError, match="split"):
        mw.prompts("text", "validation")


@pytest.mark.parametrize("size", [32, 48])
def test_render_shapes_and_background(size):
    rng = np.random.default_rng(0)
    for spec in (mw.prompts(t, "test")[0] for t in mw.TASKS):
        image = mw.render(spec, rng, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert (image == 255).all(axis=2).mean() > 0.3  # mostly white background
        assert (image < 128).any()  # something is drawn


def test_render_jitters_layouts_and_words_deterministically():
    for spec in (mw.prompts("compose", "train")[5], mw.prompts("text", "train")[5]):
        a = mw.render(spec, np.random.default_rng(0))
        assert not np.array_equal(a, mw.render(spec, np.random.default_rng(1)))
        assert np.array_equal(mw.render(spec, np.random.default_rng(0)), a)


def _ink(image):
    return (255 - image.astype(int)).max(axis=2) > 40


def test_words_stay_inside_the_frame_at_any_offset():
    rng = np.random.default_rng(0)
    for size in (32, 48):
        for spec in mw.prompts("text", "test") + mw.prompts("text", "train")[::7]:
            ink = _ink(mw.render(spec, rng, size))
            assert ink.any() and not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()), spec
    assert all(_ink(mw.render(spec, rng, 16)).any() for spec in mw.prompts("text", "test"))  # fits at 16 px too
    left, right, up, down = word_slack("BUN")
    assert mw.render_word("BUN", offset=(right, -up)).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="offset"):
        mw.render_word("BUN", offset=(right + 0.5, 0.0))


def test_letters_are_proportionally_spaced():
    """A letter's place depends on its neighbours' widths: widening the first letter (L -> H) moves the ink of
    the last letter; centred words of different widths start at different columns."""
    def columns(word):
        return np.flatnonzero(_ink(mw.render_word(word)).any(axis=0))

    narrow, wide = columns("LUT"), columns("HUT")
    assert wide[0] < narrow[0] and wide[-1] > narrow[-1]  # the word grew on both sides (it stays centred)
    last = np.flatnonzero(_ink(mw.render_word("LUT"))[:, -12:].any(axis=0))
    assert not np.array_equal(last, np.flatnonzero(_ink(mw.render_word("HUT"))[:, -12:].any(axis=0)))
    assert columns("BUN")[-1] - columns("BUN")[0] > columns("BU")[-1] - columns("BU")[0] + 4


def test_single_objects_have_their_size():
    rng = np.random.default_rng(4)
    config = ComposeConfig()
    for spec in mw.template_prompts("compose", "single", "train"):
        size = spec.spec["objects"][0].get("size")
        found = detect_objects(mw.render(spec, rng), config)
        assert len(found) == 1
        if size:
            assert found[0].size == size, (spec.text, found)


@pytest.mark.parametrize("relation", list(mw.RELATIONS))
def test_pair_layout_satisfies_its_relation(relation):
    rng = np.random.default_rng(3)
    for _ in range(500):
        for x, y, r in layout_pair(relation, rng, 32):
            assert r < x < 32 - r and r < y < 32 - r  # inside the frame
    spec = next(p for p in mw.template_prompts("compose", "position", "train") if p.spec["relation"] == relation)
    for _ in range(30):
        found = detect_objects(mw.render(spec, rng), ComposeConfig())
        by_colour = {d.colour: d for d in found}
        first, second = (by_colour[o["colour"]] for o in spec.spec["objects"])
        assert relation_holds(first, second, relation)


def test_degradations_change_images_and_keep_format():
    rng = np.random.default_rng(0)
    clean = mw.render(mw.prompts("quality", "train")[0], rng)
    for kind, severity in itertools.product(mw.DEGRADATIONS, ("mild", "heavy")):
        out = mw.degrade(clean, kind, rng, severity)
        assert out.shape == clean.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - clean).sum() > 0, kind
    with pytest.raises(ValueError, match="degradation"):
        mw.degrade(clean, "sepia", rng)
    with pytest.raises(ValueError, match="severity"):
        mw.degrade(clean, "blur", rng, "extreme")


def test_training_batch_format_and_determinism():
    a = mw.sample_training_batch(np.random.default_rng(7), 24)
    b = mw.sample_training_batch(np.random.default_rng(7), 24)
    c = mw.sample_training_batch(np.random.default_rng(8), 24)
    assert a.images.shape == (24, 3, 32, 32) and a.images.dtype == torch.float32
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert a.prompts == b.prompts and torch.equal(a.images, b.images) and a.degradations == b.degradations
    assert a.prompts != c.prompts
    assert a.tasks == [s.task for s in a.specs] and a.prompts == [s.text for s in a.specs]
    train = {p.text for p in mw.all_prompts("train")}
    assert set(a.prompts) <= train


def test_training_batch_degrades_only_quality_images_at_the_documented_rate():
    batch = mw.sample_training_batch(np.random.default_rng(0), 400, tasks=("quality",))
    rate = np.mean([bool(k) for k in batch.degradations])
    assert 0.42 < rate < 0.58  # QUALITY_DEGRADED_FRACTION = 0.5
    assert set(batch.degradations) == {""} | set(mw.DEGRADATIONS)
    other = mw.sample_training_batch(np.random.default_rng(0), 64, size=48, tasks=("compose", "text"))
    assert other.images.shape == (64, 3, 48, 48)
    assert set(other.tasks) == {"compose", "text"} and set(other.degradations) == {""}
    clean = mw.sample_training_batch(np.random.default_rng(0), 32, tasks=("quality",), quality_degraded_fraction=0.0)
    assert set(clean.degradations) == {""}


def test_training_batch_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        mw.sample_training_batch(rng, 0)
    with pytest.raises(ValueError):
        mw.sample_training_batch(rng, 4, tasks=("compose", "video"))
    with pytest.raises(ValueError):
        mw.sample_training_batch(rng, 4, quality_degraded_fraction=1.5)
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="task_weights"):
            mw.sample_training_batch(rng, 4, task_weights=bad)


def test_task_weights_set_the_task_mix_and_leave_unweighted_streams_unchanged():
    batch = mw.sample_training_batch(np.random.default_rng(0), 600, task_weights=[1.0, 2.0, 1.0])
    shares = {t: batch.tasks.count(t) / 600 for t in mw.TASKS}
    # 0.56, 0.235
    assert shares["text"] == pytest.approx(0.5, abs=0.08) and shares["compose"] == pytest.approx(0.25, abs=0.08)
    only = mw.sample_training_batch(np.random.default_rng(0), 40, task_weights=[0.0, 1.0, 0.0])
    assert set(only.tasks) == {"text"}
    plain = mw.sample_training_batch(np.random.default_rng(3), 16)  # the shipped base's data: same as before
    again = mw.sample_training_batch(np.random.default_rng(3), 16, task_weights=None)
    assert plain.prompts == again.prompts and torch.equal(plain.images, again.images)


def test_parse_task_weights():
    assert mw.parse_task_weights("compose:1, text:2;quality") == {"compose": 1.0, "text": 2.0, "quality": 1.0}
    assert mw.parse_task_weights("text") == {"text": 1.0}
    for bad, match in (("txt:1", "unknown task"), ("text:x", "not a number"), ("text:-1", ">= 0"),
                       ("text:1, text:2", "twice"), ("text:0", "at least one"), ("", "at least one")):
        with pytest.raises(ValueError, match=match):
            mw.parse_task_weights(bad)


def test_text_jitter_bounds_the_word_offset():
    """text_jitter (0, 0) draws every word centred; a wider jitter spreads the ink further; bad values raise."""
    batch = mw.sample_training_batch(np.random.default_rng(0), 24, tasks=("text",), text_jitter=(0.0, 0.0))
    for spec, image in zip(batch.specs, batch.images):
        centred = mw.render_word(spec.spec["word"])
        assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), centred)

    def spread(jitter):
        rng = np.random.default_rng(1)
        starts = [np.flatnonzero(_ink(mw.render_word("BUN", offset=mw.word_offset("BUN", rng, jitter=jitter)))
                                 .any(axis=0))[0] for _ in range(200)]
        return max(starts) - min(starts)

    assert spread((0.5, 0.5)) <= 1 < spread((1.5, 1.0)) < spread((3.0, 2.0))
    assert mw.parse_text_jitter(" 1.5, 1 ") == (1.5, 1.0) and mw.parse_text_jitter("0;0") == (0.0, 0.0)
    for bad in ("1", "1, 2, 3", "a, 1", "-1, 1", "nan, 1", ""):
        with pytest.raises(ValueError, match="x, y"):
            mw.parse_text_jitter(bad)
    with pytest.raises(ValueError, match="text_jitter"):
        mw.sample_training_batch(np.random.default_rng(0), 4, text_jitter=(1.0, -1.0))


def test_compose_error_fraction_adds_one_copy_of_a_named_object():
    """compose_error_fraction: that share of compose images (where the copy fits) shows one object too many, so
    the compose detector fails their count and nothing else; 0 leaves the data stream unchanged."""
    from flowopd_core.rewards import make_reward

    batch = mw.sample_training_batch(np.random.default_rng(0), 256, tasks=("compose",), compose_error_fraction=0.5)
    wrong = [k == "extra_copy" for k in batch.degradations]
    assert 0.3 < np.mean(wrong) < 0.55 and set(batch.degradations) <= {"", "extra_copy"}
    result = make_reward("compose")(batch.images, batch.specs)
    assert float(result.strict[torch.tensor(wrong)].max()) == 0.0
    assert float(result.strict[~torch.tensor(wrong)].mean()) >= 0.95
    for details, bad in zip(result.details, wrong):
        if bad:
            failed = {name for name, ok in details["constraints"].items() if not ok}
            assert failed and all(name.endswith("_count") or name == "relation" for name in failed)
    plain = mw.sample_training_batch(np.random.default_rng(3), 32)
    again = mw.sample_training_batch(np.random.default_rng(3), 32, compose_error_fraction=0.0)
    assert plain.prompts == again.prompts and torch.equal(plain.images, again.images)
    with pytest.raises(ValueError, match="compose_error_fraction"):
        mw.sample_training_batch(np.random.default_rng(0), 4, compose_error_fraction=-0.1)


def test_compose_crop_fraction_pushes_one_object_partly_out_of_the_frame():
    """compose_crop_fraction: that share of compose images has one object 30-60 % outside the frame, which the
    compose detector mostly fails (its shape against a truncated box); the other images stay right; text and
    quality images are untouched; 0 leaves the data stream unchanged."""
    from flowopd_core.rewards import make_reward

    batch = mw.sample_training_batch(np.random.default_rng(0), 256, tasks=("compose",), compose_crop_fraction=0.5)
    cropped = torch.tensor([k == "crop" for k in batch.degradations])
    assert 0.4 < float(cropped.float().mean()) < 0.6 and set(batch.degradations) <= {"", "crop"}
    result = make_reward("compose")(batch.images, batch.specs)
    assert float(result.strict[cropped].mean()) < 0.4
    assert float(result.strict[~cropped].mean()) >= 0.95
    # a cropped object touches the frame: some object pixel lies in the outermost row or column
    edge = torch.ones(32, 32, dtype=torch.bool)
    edge[1:-1, 1:-1] = False
    ink = (batch.images < 0.8).any(dim=1)  # (B, H, W): away from the white background
    assert bool((ink & edge).flatten(1).any(dim=1)[cropped].all())
    both = mw.sample_training_batch(np.random.default_rng(1), 64, tasks=("compose",), compose_error_fraction=1.0,
                                    compose_crop_fraction=1.0)
    assert set(both.degradations) <= {"crop", "extra_copy+crop"} and "extra_copy+crop" in both.degradations
    mixed = mw.sample_training_batch(np.random.default_rng(2), 64, compose_crop_fraction=1.0)
    assert all((k == "crop") == (t == "compose") for k, t in zip(mixed.degradations, mixed.tasks) if t != "quality")
    plain = mw.sample_training_batch(np.random.default_rng(3), 32)
    again = mw.sample_training_batch(np.random.default_rng(3), 32, compose_crop_fraction=0.0)
    assert plain.prompts == again.prompts and torch.equal(plain.images, again.images)
    with pytest.raises(ValueError, match="compose_crop_fraction"):
        mw.sample_training_batch(np.random.default_rng(0), 4, compose_crop_fraction=1.5)


def _two_objects(template: str, same: str = "") -> mw.PromptSpec:
    """The first compose training prompt of ``template`` whose two objects differ in colour and shape (or share
    their shape: ``same="shape"``)."""
    for spec in mw.template_prompts("compose", template, "train"):
        a, b = spec.spec["objects"]
        if a["colour"] != b["colour"] and (a["shape"] == b["shape"]) == (same == "shape"):
            return spec
    raise AssertionError(f"no {template} prompt with same={same!r}")


def test_binding_pixels_mark_where_a_shape_swap_changes_the_image():
    """binding_pixels: exactly the pixels that change when the two named objects swap shapes, places kept; the
    swapped drawing fails the prompt (the mask is where the binding shows) and passes the swapped prompt; no
    mask where a swap changes nothing the prompt names (one object, shared colour or shape)."""
    from dataclasses import replace

    from flowopd_core.rewards import make_reward

    reward = make_reward("compose")
    for template in ("pair", "position"):
        spec = _two_objects(template)
        (a, b) = spec.spec["objects"]
        placed = mw.rendering.placed_objects(spec, np.random.default_rng(0))
        swap = {a["shape"]: b["shape"], b["shape"]: a["shape"]}
        swapped = [replace(o, shape=swap[o.shape]) for o in placed]
        before, after = mw.rendering.draw_objects(placed, 32), mw.rendering.draw_objects(swapped, 32)
        mask = mw.rendering.binding_pixels(placed, spec.spec["objects"])
        changed = np.abs(before.astype(int) - after.astype(int)).max(axis=2)
        assert mask.shape == (32, 32) and 0 < mask.sum() < 0.3 * mask.size
        assert np.array_equal(mask, changed > mw.rendering.BINDING_THRESHOLD)
        twin = {**spec.spec, "objects": [{**a, "shape": b["shape"]}, {**b, "shape": a["shape"]}]}
        assert np.array_equal(mw.rendering.binding_pixels(swapped, twin["objects"]), mask)  # symmetric
        scores = reward.score_batch(np.stack([before, after]), [spec, replace(spec, spec=twin)])
        assert scores[0].strict == 1.0 and scores[1].strict == 1.0  # the swapped drawing is the twin's image
        assert reward.score_batch(after[None], [spec])[0].strict == 0.0  # ... and fails the prompt itself
    pair = _two_objects("pair")
    one_colour = replace(pair, spec={**pair.spec, "objects": [pair.spec["objects"][0],
                                                              {**pair.spec["objects"][1], "colour": a["colour"]}]})
    for spec in (_two_objects("pair", same="shape"), one_colour, mw.template_prompts("compose", "single", "train")[0]):
        placed = mw.rendering.placed_objects(spec, np.random.default_rng(1))
        assert not mw.rendering.binding_pixels(placed, spec.spec["objects"]).any()


def test_the_compose_data_stream_is_the_one_the_bases_were_trained_on():
    """The compose images and prompts of a seeded stream, plain and with both error options and template weights,
    hash to the digest the code that trained the shipped and relations bases gives (computed at beb50d0, before
    the binding masks restructured the compose draws): a change to the draws fails here."""
    import hashlib

    digest = hashlib.sha256()
    for kw in ({}, {"compose_error_fraction": 0.3, "compose_crop_fraction": 0.4,
                    "template_weights": {"compose": {"position": 4}}}):
        batch = mw.sample_training_batch(np.random.default_rng(7), 48, tasks=("compose",), **kw)
        digest.update(batch.images.numpy().tobytes())
        digest.update("|".join(batch.prompts + batch.degradations).encode())
    assert digest.hexdigest() == "6a7d4af8668fd95c3b2565cfd62172f7ea7141acb6b9bf5edcb5f20ee0f0c3d9"


def test_binding_masks_leave_the_data_stream_unchanged():
    """sample_training_batch(binding_masks=True): the same images and prompts, plus (B, 1, H, W) masks that are
    non-zero exactly on the compose images naming two objects of different colours and shapes."""
    kw = dict(compose_crop_fraction=0.3, compose_error_fraction=0.3)
    plain = mw.sample_training_batch(np.random.default_rng(5), 96, **kw)
    masked = mw.sample_training_batch(np.random.default_rng(5), 96, binding_masks=True, **kw)
    assert plain.binding is None and masked.prompts == plain.prompts and torch.equal(masked.images, plain.images)
    assert masked.binding.shape == (96, 1, 32, 32) and set(masked.binding.unique().tolist()) == {0.0, 1.0}
    for spec, mask in zip(masked.specs, masked.binding):
        objects = spec.spec.get("objects") or []
        binds = (spec.task == "compose" and len(objects) == 2 and objects[0]["colour"] != objects[1]["colour"]
                 and objects[0]["shape"] != objects[1]["shape"])
        assert bool(mask.any()) == binds, spec.text


def test_template_weights_shift_the_templates_within_a_task():
    """template_weights: a named task draws its templates in proportion to their weights (1 where not named), the
    other tasks stay uniform; none leaves the shipped base's data stream unchanged; bad weights raise."""
    assert mw.parse_template_weights("compose/position:4, compose/single:0;quality/pair:2") == {
        "compose": {"position": 4.0, "single": 0.0}, "quality": {"pair": 2.0}}
    for bad, match in (("position:4", "unknown template"), ("compose/word2:1", "unknown template"),
                       ("compose/pair:x", "not a number"), ("compose/pair:-1", ">= 0"),
                       ("compose/pair:1, compose/pair:2", "twice"),
                       ("text/word2:0, text/word3:0", "every template of 'text'")):
        with pytest.raises(ValueError, match=match):
            mw.parse_template_weights(bad)
    weights = mw.parse_template_weights("compose/position:5, compose/single:0")
    batch = mw.sample_training_batch(np.random.default_rng(0), 400, tasks=("compose", "text"),
                                     template_weights=weights)
    compose = [s.spec["template"] for s in batch.specs if s.task == "compose"]
    text = [s.spec["template"] for s in batch.specs if s.task == "text"]
    assert "single" not in compose and compose.count("position") / len(compose) == pytest.approx(5 / 7, abs=0.08)
    assert text.count("word2") / len(text) == pytest.approx(0.5, abs=0.1)
    plain = mw.sample_training_batch(np.random.default_rng(3), 32)
    again = mw.sample_training_batch(np.random.default_rng(3), 32, template_weights={})
    assert plain.prompts == again.prompts and torch.equal(plain.images, again.images)
    for bad in ({"compose": {"word2": 1.0}}, {"compose": {"pair": "2"}}, {"compose": {"pair": float("inf")}}):
        with pytest.raises(ValueError, match="template_weights"):
            mw.sample_training_batch(np.random.default_rng(0), 4, template_weights=bad)
