"""A policy: the flow transformer plus named LoRA adapters, through peft's native API (docs/architecture.md).

Several adapters (student, teachers, anchors) share one frozen base. The reference model of the KL terms
(docs/method.md §2, §5) is the same network with adapters disabled: :meth:`Policy.disable` (exact, free). One
batch can mix adapters per sample (``adapter_names`` in :func:`flowopd_core.models.pipeline.velocity`, peft's mixed
batch inference), e.g. the routed teachers of a distillation batch (docs/method.md §4).

Trainability is explicit and independent of which adapter is active: peft's ``set_adapter(x)`` makes ``x``
trainable and freezes every other adapter, so :class:`Policy` restores its own trainable set after every peft
call; only :meth:`Policy.trainable_parameters` changes it. The transformer stays in eval mode even while
training (it has no dropout, and peft refuses ``adapter_names`` in train mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

BASE_ADAPTER = "__base__"
"""peft's per-sample adapter name for "no adapter" (the base model) in ``adapter_names``."""
ATTENTION_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
"""LoRA targets of Flow-GRPO / Flow-OPD (docs/method.md §2): the joint-attention projections of every block."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """Shape and initialisation of one LoRA adapter (docs/method.md §2 defaults: rank 32, alpha 64)."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    targets: tuple[str, ...] = field(
        default=ATTENTION_TARGETS, metadata={"help": "module-name suffixes that get an adapter"}
    )
    init: bool | str = field(
        default=True,
        metadata={"help": "peft init_lora_weights: True = B zero (starts as the base), 'gaussian', False = random"},
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRA targets must be non-empty module names, got {self.targets!r}")

    def to_peft(self, exclude: Sequence[str] = ()) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            exclude_modules=list(exclude) or None,
            init_lora_weights=self.init,
            lora_dropout=0.0,
        )


def dead_targets(transformer: torch.nn.Module) -> list[str]:
    """Projections whose output never reaches the image: in a ``context_pre_only`` block (SD3's last) the
    text-token attention output is dropped, so its text query ``add_q_proj`` gets no gradient. A LoRA there
    would be dead weight (and would skew merges), so adapters leave it out."""
    blocks = getattr(transformer, "transformer_blocks", [])
    return [
        f"transformer_blocks.{i}.attn.add_q_proj"
        for i, b in enumerate(blocks)
        if getattr(b, "context_pre_only", False)
    ]


class Policy:
    """``transformer`` + named LoRA adapters. Call it like the transformer (kwargs are passed through).

    The first adapter added or loaded becomes the active one (peft's behaviour); later ones do not. No adapter
    is trainable until :meth:`trainable_parameters` names one. The base weights are always frozen.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        transformer.requires_grad_(False)
        transformer.eval()
        self._base = transformer
        self._dtype, self._device = transformer.dtype, transformer.device  # diffusers walks the parameters
        self._peft: PeftModel | None = None
        self._trainable: set[str] = set()

    # ----------------------------------------------------------------------------------------- state

    @property
    def model(self) -> torch.nn.Module:
        """The callable network: the ``PeftModel`` once an adapter exists, else the bare transformer."""
        return self._peft if self._peft is not None else self._base

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._peft.peft_config) if self._peft is not None else ()

    @property
    def active(self) -> str | None:
        return self._peft.active_adapter if self._peft is not None else None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def base_parameters(self) -> int:
        """Parameters of the base transformer (adapters excluded)."""
        return sum(p.numel() for n, p in self._base.named_parameters() if "lora_" not in n)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the transformer blocks' activations in backward passes (diffusers'
        ``enable_gradient_checkpointing``: non-reentrant ``torch.utils.checkpoint`` per block; forwards without
        grad are unaffected)."""
        if enabled:
            self._base.enable_gradient_checkpointing()
        else:
            self._base.disable_gradient_checkpointing()

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def _check_new(self, name: str) -> None:
        if not name or "." in name or name == BASE_ADAPTER:
            raise ValueError(f"invalid adapter name {name!r} (non-empty, no dots, not {BASE_ADAPTER!r})")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists (have {list(self.adapters)})")

    def _check_known(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r} (have {list(self.adapters)})")

    def _restore_trainable(self) -> None:
        """Re-apply the policy's trainable set (peft calls change ``requires_grad``) and eval mode."""
        markers = tuple(f".{name}." for name in self._trainable)
        for param_name, param in self.model.named_parameters():
            param.requires_grad_("lora_" in param_name and any(m in param_name for m in markers))
        self.model.eval()

    # ----------------------------------------------------------------------------------------- adapters

    def add_adapter(self, name: str, spec: LoraSpec = LoraSpec()) -> None:
        """Add a new LoRA adapter ``name`` (frozen until :meth:`trainable_parameters` names it)."""
        self._check_new(name)
        config = spec.to_peft(exclude=dead_targets(self._base))
        if self._peft is None:
            self._peft = get_peft_model(self._base, config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
        self._restore_trainable()

    def load_adapter(self, name: str, directory: str | Path) -> None:
        """Load an adapter saved by :meth:`save_adapter` (or any peft LoRA folder) under the name ``name``."""
        self._check_new(name)
        directory = Path(directory)
        for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (directory / required).is_file():
                raise FileNotFoundError(f"no LoRA adapter at {str(directory)!r}: {required} is missing")
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, directory, adapter_name=name, is_trainable=True)
        else:
            self._peft.load_adapter(directory, adapter_name=name, is_trainable=True)
        self._restore_trainable()

    def save_adapter(self, name: str, directory: str | Path) -> Path:
        """Write adapter ``name`` as peft's format: ``adapter_model.safetensors`` + ``adapter_config.json``."""
        self._check_known(name)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self._peft, adapter_name=name)
        save_file(
            {key: value.detach().contiguous() for key, value in state.items()},
            directory / ADAPTER_WEIGHTS,
            metadata={"format": "pt"},
        )
        self._peft.peft_config[name].save_pretrained(directory)
        return directory

    def set_active(self, name: str) -> None:
        """Make ``name`` the adapter used by plain forwards (trainability unchanged)."""
        self._check_known(name)
        if self._peft.active_adapter == name:
            return
        self._peft.set_adapter(name)
        self._restore_trainable()

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Inside the block every adapter is off: forwards are exactly the base (reference) model."""
        if self._peft is None:
            yield
            return
        with self._peft.disable_adapter():
            yield

    def adapter_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The LoRA parameters of adapter ``name`` by (peft) parameter name."""
        self._check_known(name)
        marker = f".{name}."
        return {n: p for n, p in self._peft.named_parameters() if "lora_" in n and marker in n}

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Make ``name`` the only trainable adapter and return its parameters (build the optimizer from them)."""
        params = self.adapter_parameters(name)
        self._trainable = {name}
        self._restore_trainable()
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if sorted(trainable) != sorted(params):
            raise RuntimeError(f"trainable parameters differ from adapter {name!r}'s LoRA parameters")
        return list(params.values())
