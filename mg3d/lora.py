"""LoRA adapters on the policy (``model.policy.lora``), through ``peft`` and transformers' adapter integration.

Why in place: the adapters are injected into the Hugging Face model itself (``model.add_adapter``), so
``policy.model`` stays the Qwen-VL class that generation, the shared prefill and the chunked log-prob head call,
and Lightning checkpoints hold base and adapter weights under stable names (resume loads them strictly). The
reference policy of the KL term is the same model with its adapters switched off (:func:`adapters_disabled`), not
a second copy. For inference the adapters are folded into the base weights (:func:`merge_lora`), so the Grounder
and MONAI bundles ship a plain Qwen-VL folder; :func:`save_adapter` writes the adapter alone in PEFT's format.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mg3d.errors import ConfigError

__all__ = [
    "ADAPTER_NAME",
    "LoRAConfig",
    "adapters_disabled",
    "apply_lora",
    "has_lora",
    "lora_parameter_names",
    "merge_lora",
    "save_adapter",
]

#: The one adapter mg3d trains (peft's default name, so a saved adapter loads with ``PeftModel.from_pretrained``).
ADAPTER_NAME = "default"
_LANGUAGE_PREFIX = r"model\.language_model\.layers\.\d+\."
_VISION_PREFIX = r"model\.visual\.blocks\.\d+\."
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning: only the adapters train, the base weights stay frozen.

    Args:
        rank: r, the adapters' inner dimension.
        alpha: LoRA's α; the update is scaled by α / r.
        dropout: dropout on the adapters' input (training mode only).
        target_modules: names of the language model's linear layers that get adapters (attention and MLP by
            default, as VLM-R1 and TRL's examples do).
        vision: ``frozen`` keeps the vision tower (and its merger) fixed and adapter-free; ``adapted`` also puts
            adapters on ``vision_target_modules`` in the vision blocks.
        vision_target_modules: vision-block linear layers adapted when ``vision: adapted`` (Qwen2.5-VL:
            ``qkv``, ``proj``, ``gate_proj``, ``up_proj``, ``down_proj``; Qwen2-VL's MLP is ``fc1``/``fc2``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    vision: Literal["frozen", "adapted"] = "frozen"
    vision_target_modules: list[str] = field(
        default_factory=lambda: ["qkv", "proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"policy.lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"policy.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"policy.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.vision not in ("frozen", "adapted"):
            raise ConfigError(f"policy.lora.vision must be 'frozen' or 'adapted', got {self.vision!r}")
        for key in ("target_modules", "vision_target_modules"):
            names = list(getattr(self, key))
            bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
            if bad or (key == "target_modules" and not names):
                raise ConfigError(
                    f"policy.lora.{key} must be a non-empty list of module names (e.g. q_proj), got {names}"
                )

    def target_pattern(self) -> str:
        """The full-name regex peft matches: the named layers of the language model (and vision blocks)."""
        pattern = rf"{_LANGUAGE_PREFIX}(.*\.)?({'|'.join(self.target_modules)})"
        if self.vision == "adapted" and self.vision_target_modules:
            pattern += rf"|{_VISION_PREFIX}(.*\.)?({'|'.join(self.vision_target_modules)})"
        return pattern


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # an extra, so a clear message instead of a bare ImportError
        raise ConfigError(
            "policy.lora needs the 'peft' package: pip install 'mg3d[lora]' (or -c requirements/lock.txt peft)"
        ) from err
    return peft


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    """Whether the model carries (unmerged) LoRA adapters."""
    return bool(getattr(model, "_hf_peft_config_loaded", False)) and bool(_tuner_layers(model))


def lora_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapter parameters (the only trainable ones after :func:`apply_lora`)."""
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


def apply_lora(model: Any, config: LoRAConfig) -> int:
    """Inject LoRA adapters into ``model`` in place and freeze every other weight; returns the adapted layers.

    Adapters start as an exact no-op (peft initialises B = 0), so the policy's outputs are unchanged until the
    first optimiser step.
    """
    peft = _peft()
    if has_lora(model):
        raise ConfigError("the policy already carries LoRA adapters; apply policy.lora once")
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_pattern(),
        bias="none",
    )
    try:
        model.add_adapter(lora, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(
            f"policy.lora: no layer of the model matches target_modules={config.target_modules}"
            f"{' / vision_target_modules=' + str(config.vision_target_modules) if config.vision == 'adapted' else ''}"
            f" ({str(err).splitlines()[0][:200]})"
        ) from None
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return len(_tuner_layers(model))


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model: every adapter off inside the block (the KL term's reference policy), back on after."""
    if not has_lora(model):
        raise ConfigError("adapters_disabled needs a policy with LoRA adapters (policy.lora)")
    model.disable_adapters()  # type: ignore[operator]
    try:
        yield model
    finally:
        model.enable_adapters()  # type: ignore[operator]


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back; returns the layers merged.

    Afterwards the model is an ordinary Qwen-VL model (``save_pretrained`` writes full weights) whose outputs
    equal the adapted model's up to float rounding.
    """
    layers = _tuner_layers(model)
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False  # type: ignore[assignment]
    return len(layers)


def save_adapter(model: Any, folder: str | Path) -> Path:
    """Write the adapter alone (``adapter_model.safetensors`` + ``adapter_config.json``, PEFT's format)."""
    if not has_lora(model):
        raise ConfigError(f"{folder}: the policy has no LoRA adapters to save")
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)  # with adapters loaded: the adapter only
    return out
