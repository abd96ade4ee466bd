"""Pretraining the mini-world base model."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from flowopd_core.choices import DEVICES
from flowopd_core.miniworld.options import (
    TEXT_JITTER,
    parse_task_weights,
    parse_template_weights,
    parse_text_jitter,
)
from flowopd_core.miniworld.tasks import QUALITY_DEGRADED_FRACTION, TASKS
from flowopd_core.miniworld.tiny_config import TinyConfig
from flowopd_core.training.pretrain_config import PretrainConfig
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import (
    In,
    Node,
    Out,
    SettingsNode,
    build_config,
    config_inputs,
    legacy_widgets,
    settings_input,
    split_ports,
)

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef

_BIG = {"min": 1, "max": 10**7}
_TINY_INPUTS = config_inputs(
    TinyConfig,
    sample_size={"min": 8, "max": 256},
    patch_size={"min": 1, "max": 16},
    num_layers={"min": 1, "max": 48},
    num_attention_heads={"min": 1, "max": 64},
    attention_head_dim={"min": 8, "max": 256},
    text_dim={"min": 8, "max": 4096},
    clip_hidden={"min": 4, "max": 2048},
    text_layers={"min": 1, "max": 24},
    text_heads={"min": 1, "max": 32},
    clip_max_length={"min": 3, "max": 512},
    t5_max_length={"min": 1, "max": 512},
    vae_latent_channels={"min": 0, "max": 16},
    shift={"min": 0.1, "max": 20.0},
)
_PRETRAIN_INPUTS = config_inputs(
    PretrainConfig,
    skip=("image_size", "max_sequence_length", "binding_weight"),
    steps=_BIG,
    minutes={"min": 0.0, "max": 100000.0},
    batch_size={"min": 1, "max": 4096},
    lr={"min": 0.0, "max": 1.0},
    warmup_steps={"min": 0, "max": 10**6},
    weight_decay={"min": 0.0, "max": 1.0},
    grad_clip={"min": 0.0, "max": 1000.0},
    ema_decay={"min": 0.0, "max": 0.99999},
    cfg_dropout={"min": 0.0, "max": 0.99},
    logit_mean={"min": -5.0, "max": 5.0},
    logit_std={"min": 0.01, "max": 5.0},
    seed={"min": 0, "max": 2**31 - 1},
    log_every=_BIG,
    snapshot_every={"min": 0, "max": 10**7},
)


_WIDGETS = (
    In("quality_degraded_fraction", "FLOAT", QUALITY_DEGRADED_FRACTION,
       "share of the quality task's training images that are degraded (sets where a fully trained base's "
       "quality score lands: the data score 0.72 at 0.5, 0.655 at 0.65)", min=0.0, max=1.0, step=0.05),
    In("compose_error_fraction", "FLOAT", 0.0,
       "share of the compose task's training images drawn with one named object too many (caption noise: a "
       "count error the base then makes at about this rate, for RL to remove); 0 = none (the shipped base)",
       min=0.0, max=1.0, step=0.05),
    In("task_weights", "STRING", "",
       "share of each task in the training batches, e.g. 'compose:1, text:2, quality:1' (tasks not named get "
       "none); empty = the three tasks equally"),
    In("text_jitter", "STRING", "",
       "largest random (x, y) offset of the text task's words, 'x, y' in px at 32 px (scaled with the size); "
       f"empty = the default {TEXT_JITTER[0]:g}, {TEXT_JITTER[1]:g}. Larger offsets make the text task harder "
       "to learn"),
    In("device", "COMBO", "auto",
       "where to train: auto = cuda when a GPU is visible, else cpu (the data are drawn on the CPU either way, "
       "so the random streams do not depend on the device)", choices=DEVICES),
    *_TINY_INPUTS,
    *_PRETRAIN_INPUTS,
    In("template_weights", "STRING", "",
       "how often each template is drawn within its task, e.g. 'compose/position:4' (a named task's other "
       "templates keep weight 1; tasks not named draw their templates equally); empty = all equally (the "
       "shipped base). Among the last widgets, so workflows saved before it keep their order"),
    In("compose_crop_fraction", "FLOAT", 0.0,
       "share of the compose task's training images with one object 30-60 % outside the frame (a layout error "
       "no caption names, so guidance does not steer away from it: the base then makes it, for a compose "
       "teacher to remove); 0 = none. Last among the widgets, so workflows saved before it keep their order",
       min=0.0, max=1.0, step=0.05),
    In("binding_weight", "FLOAT", 0.0,
       "extra loss weight on the pixels that show which shape goes with which colour in two-object compose "
       "images (where the image changes if the two shapes swap colours): 1 + this there, 1 elsewhere. The plain "
       "loss barely rewards binding (those pixels are about 14 % of a two-object image, 5 % of all compose "
       "pixels), so a base learns the shapes and colours a prompt names but not which goes with which; 0 = the "
       "plain loss (the shipped base). Last among the widgets, so workflows saved before it keep "
       "their order",
       min=0.0, max=1000.0, step=1.0),
)
ON_NODE = ("quality_degraded_fraction", "task_weights", "text_jitter", "device", "steps", "minutes", "batch_size",
           "lr", "warmup_steps", "ema_decay", "seed", "snapshot_every")
"""The widgets the node shows itself; the architecture and the optimiser's details are its settings companion's."""
_ON_NODE, _ADVANCED = split_ports(_WIDGETS, ON_NODE)


class PretrainSettings(SettingsNode):
    NODE_ID = "FlowOPDPretrainSettings"
    DISPLAY_NAME = "Mini-world pretraining settings"
    DESCRIPTION = (
        "The mini-world pretraining's architecture (sizes of the tiny SD3 transformer and text encoders) and "
        "optimiser details (schedule, weight decay, clipping, CFG dropout, timestep sampling, logging): link to "
        "the pretraining node's `settings` input. Nothing linked: these defaults."
    )
    INPUTS = _ADVANCED
    OUTPUTS = (Out("settings", "FLOWOPD_PRETRAIN_SETTINGS", "the settings, for a pretraining node's `settings`"),)


class PretrainMiniWorld(Node):
    NODE_ID = "FlowOPDPretrainMiniWorld"
    DISPLAY_NAME = "Pretrain mini-world base"
    CATEGORY = "FlowOPD/train"
    DESCRIPTION = (
        "Builds a tiny SD3-architecture pipeline offline (tiny CLIP/T5 encoders, SD3 transformer, pixel space by "
        "default) and pretrains it on the mini-world's train prompts with the rectified-flow loss. Writes a "
        "standard diffusers pipeline folder (EMA weights) and a loss curve; with snapshot_every > 0 also the EMA "
        "weights every that many steps as pipeline folders snapshots/step_NNNNN/ among its artifacts. With `init` "
        "linked it continues training that pipeline instead (its architecture is kept; the architecture fields "
        "must then be left at their defaults)."
    )
    SETTINGS = PretrainSettings
    LEGACY_WIDGETS = legacy_widgets(
        _WIDGETS, added_since=("compose_error_fraction", "template_weights", "compose_crop_fraction", "binding_weight"))
    INPUTS = (
        In("init", "FLOWOPD_MODEL", optional=True,
           help="continue pretraining this pipeline (e.g. an earlier pretrain node's model) instead of a new one"),
        settings_input(PretrainSettings),
        *_ON_NODE,
    )
    OUTPUTS = (
        Out("model", "FLOWOPD_MODEL", "the pretrained pipeline folder (labelled with the node's id in reports)"),
        Out("loss_curve", "FLOWOPD_FILE", "loss curve (PNG)"),
    )

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        errors = []
        for name, parse in (("task_weights", parse_task_weights), ("text_jitter", parse_text_jitter),
                            ("template_weights", parse_template_weights)):
            if params[name].strip():
                try:
                    parse(params[name])
                except ValueError as err:
                    errors.append((name, str(err)))
        return errors

    @classmethod
    def check_links(cls, params: dict, linked: frozenset[str]) -> list[tuple[str, str]]:
        if "init" not in linked:
            return []
        return [(port.name, "the architecture comes from the linked `init` model; leave this field unset")
                for port in _TINY_INPUTS if port.name in params and params[port.name] != port.default]

    def run(self, init: ModelRef | None = None, quality_degraded_fraction: float = QUALITY_DEGRADED_FRACTION,
            compose_error_fraction: float = 0.0, task_weights: str = "", text_jitter: str = "",
            device: str = "auto", template_weights: str = "", compose_crop_fraction: float = 0.0,
            **values) -> tuple:
        from flowopd_core.miniworld.rendering import sample_training_batch
        from flowopd_core.miniworld.tiny import build_tiny_pipeline
        from flowopd_core.models.modelref import ModelRef, resolve_device
        from flowopd_core.models.pipeline import load_pipeline
        from flowopd_core.training.pretrain import pretrain

        tiny = build_config(TinyConfig, values)
        if init is None:
            pipe = build_tiny_pipeline(tiny, seed=values["seed"])
            image_size, t5_length = tiny.image_size, tiny.t5_max_length
        else:  # continue training: the architecture (and T5 length) are the init pipeline's
            pipe = load_pipeline(init.path)
            image_size, t5_length = pipe.transformer.config.sample_size * pipe.vae_scale_factor, None
        pipe.to(resolve_device(device))
        config = build_config(PretrainConfig, {**values, "image_size": image_size, "max_sequence_length": t5_length})
        ctx = context.current()
        bar = ctx.progress(config.steps, "pretrain")
        last = [0]

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(step - last[0])
            last[0] = step
            ctx.metrics({"step": step, "loss": loss})

        try:
            weights = None
            if task_weights.strip():
                named = parse_task_weights(task_weights)
                weights = [named.get(task, 0.0) for task in TASKS]
            jitter = parse_text_jitter(text_jitter) if text_jitter.strip() else None
            data = functools.partial(sample_training_batch, quality_degraded_fraction=quality_degraded_fraction,
                                     compose_error_fraction=compose_error_fraction, task_weights=weights,
                                     text_jitter=jitter, template_weights=parse_template_weights(template_weights),
                                     compose_crop_fraction=compose_crop_fraction,
                                     binding_masks=config.binding_weight > 0)
            result = pretrain(pipe, data, config, ctx.artifact_dir, progress=progress)
        finally:
            bar.close()
        return (ModelRef(str(result.path), label=ctx.node_id), str(ctx.artifact_dir / "loss.png"))
