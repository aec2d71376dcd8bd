"""FSDP2 sharding of the policy, and its full parameters gathered once per rollout (not once per token).

Why: HF ``generate`` on a sharded model all-gathers every layer at every decoding step (FSDP2's pre-forward hook
runs for each token's forward), which is the slowest way to generate. :func:`gathered_parameters` is mg3d's
equivalent of TRL's ``unwrap_model_for_generation``: one all-gather per FSDP unit, every decoding step on the
gathered weights, then the shards back. The sharding plan (:func:`shard_policy`) puts each vision block and each
decoder layer in its own unit and the rest — embeddings, final norm, vision merger and the output head, which
Qwen ties to the embeddings — in the root unit, which FSDP2 keeps gathered from forward to backward (so the
chunked log-prob head of :mod:`mg3d.generation.logprobs` may call the output head after the forward).

Only ``torch.distributed`` is used; it runs on CPU with the gloo backend (tests: 2 processes) and on GPUs with
NCCL. DeepSpeed ZeRO-3 is not wired in: see ``docs/scaling.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mg3d.errors import ConfigError

__all__ = ["fsdp_units", "gathered_parameters", "is_sharded", "shard_policy"]


def fsdp_units(model: torch.nn.Module) -> list[Any]:
    """Every FSDP2 unit inside ``model`` (itself included), outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is (or holds) an FSDP2 unit."""
    return bool(fsdp_units(model))


def shard_policy(model: Any, mesh: Any = None, *, mp_policy: Any = None) -> int:
    """Shard a Qwen-VL model in place with FSDP2: one unit per vision block and per decoder layer, plus the root.

    ``mesh`` is the data-parallel device mesh (``None``: the default process group); ``mp_policy`` an optional
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (bf16 on GPUs). Returns the number of units.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        raise ConfigError("the policy is already sharded; shard_policy runs once (in configure_model)")
    try:
        units = [*model.model.visual.blocks, *model.model.language_model.layers]
    except AttributeError as err:
        raise ConfigError(
            f"shard_policy expects a Qwen2-VL / Qwen2.5-VL model, got {type(model).__name__}"
        ) from err
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for unit in units:
        fully_shard(unit, **kwargs)
    # The root's parameters stay gathered from forward to backward — FSDP2's default for a root, set explicitly
    # so that it holds before FSDP's lazy initialisation too (gathered_parameters restores what it reads).
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return len(units) + 1


def _reshards_after_forward(unit: Any) -> bool:
    groups = getattr(unit._get_fsdp_state(), "_fsdp_param_groups", [])
    return any(g.post_forward_mesh_info is not None for g in groups)


@contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Full parameters inside the block: each FSDP unit all-gathered once, none resharded until the block ends.

    A no-op for an unsharded model, so callers use it unconditionally around generation and no-gradient passes.
    Memory: the full model is resident on every rank for the duration (as with ZeRO-3's ``GatheredParameters``).
    """
    units = fsdp_units(model)
    if not units:
        yield model
        return
    flags = [_reshards_after_forward(u) for u in units]
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit, flag in zip(units, flags):
            unit.set_reshard_after_forward(flag, recurse=False)
        for unit in units:
            unit.reshard()
