"""Benchmark one GRPO optimiser step: mg3d ``GRPOModule`` vs TRL ``GRPOTrainer`` (2D), shared vs repeated
prompt (3D), and the fraction of the CPU's matmul peak the step reaches.

Run by hand, alone on the machine (the default run takes 20 - 30 min on one thread, depending on load)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_step.py --plot docs/figures/grpo_step.png

One step = generation (G completions per prompt, sampled at T = 1, up to 64 new tokens) + the IoU reward +
group advantages + the DAPO loss (β = 0) + backward + gradient clipping + AdamW + the LR schedule, on the
tiny Qwen2.5-VL of ``mg3d.model`` (same seed, so the same weights) and the same prompts in every path.

* **2D** (``--parts 2d``): mg3d's ``GRPOModule`` inside a Lightning ``Trainer`` against TRL 1.16's
  ``GRPOTrainer`` on the same image prompts (checked token for token), same reward, loss, lr, G and
  generation batch, both in float32 without activation checkpointing (issue 23's target: mg3d ≤ 0.33× TRL).
  Unless ``--no-lean``, also mg3d with the opt-in speed-ups of issue 23, the lean decoder
  (``RolloutConfig.decoder="lean"``) and fused AdamW (``OptimConfig.fused``); unless ``--no-bf16``, also TRL with
  its own defaults (bf16 autocast, activation checkpointing: what a TRL user gets) and mg3d with Lightning's
  ``precision="bf16-mixed"``.
* **3D** (``--parts 3d``): volumes shown as video (N merged vision tokens each); mg3d as built
  (``RolloutConfig.share_prompt=True``: vision tower and prefill once per prompt, KV cache shared by the G
  samples, also in the training forward) against ``share_prompt=False`` (generation through
  ``generate(num_return_sequences=G)``, training forward over G copies of the whole prompt); unless
  ``--no-lean``, a third path: shared with the lean decoder and fused AdamW. Targets at 1,000 vision tokens:
  ≥ 3× at G = 4, ≥ 4.5× at G = 8, and an MFU ≥ 25 % at G = 8.
* **real** (``--parts real``): rollouts on the real-architecture Qwen2.5-VL folder
  (``mg3d.testing.real_architecture_folder``, 151,936-row vocabulary): tokens/s and the time in the LM head,
  in the rest of the model and outside it, with transformers' ``multinomial``, the inverse-CDF sampler
  (``RolloutConfig.sampler``) and that sampler with compiled decoding or the lean decoder.
* **MFU**: the matmul FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``, with the CPU
  flash-attention kernels added) over the median step time, against the peak of a large matmul (float32;
  bfloat16 for the bf16 paths) timed in the same process and thread count.

Each path runs in its real training loop (``Trainer.fit`` / ``GRPOTrainer.train``, TRL in a worker thread)
and a step is timed from the loop's step-begin hook to its step-end hook, so data loading is outside the
timing and everything listed above is inside. The loops run in lockstep: exactly one step of one path at a
time, the paths taking turns step by step, so a load change on the shared machine hits all alike; ratios
are medians of per-step ratios. The first ``--warmup`` steps of each path are not timed (the first one
counts FLOPs). Every step is also split into phases (generation, training forward, backward, optimiser,
other). Where a target is missed, one more step of each path runs under ``torch.profiler`` and the top
operators by self CPU time are printed. Prints markdown (and writes it with ``--out``), a plot with
``--plot``, and the exact command.

One file over ~600 lines on purpose: a script run by hand whose parts share one lockstep runner, phase clock,
FLOP counting and report, and which a reader should be able to check top to bottom in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.flop_counter import FlopCounterMode

from mg3d.frames import CoordinateFrame

PHASES = ("generate", "train forward", "backward", "optimizer", "other")
TARGET_2D = 0.33  # mg3d step time / TRL step time (issue 23; issue 8 asked for 0.5)
TARGET_3D = {4: 3.0, 8: 4.5}  # G -> repeated / shared step time, at TARGET_3D_TOKENS vision tokens
TARGET_3D_TOKENS = 1000
TARGET_MFU_3D = 0.25  # the 3D step at TARGET_3D_TOKENS, G = 8, against the float32 matmul peak
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------
# running several training loops in turn
# ---------------------------------------------------------------------------------------------------
class Lockstep:
    """Lets the steps of several training loops (threads) run strictly one at a time, in turn, and times them.

    A loop calls :meth:`begin` in its step-begin hook and :meth:`end` in its step-end hook. It keeps the turn
    until its next ``begin`` (or :meth:`finish`), so the work between its steps (logging, fetching the next
    batch) never overlaps another loop's step either. Several paths may share one thread (one Lightning loop
    switching a setting step by step): ``begin`` hands on the turn the calling thread holds.
    ``instrument(path, step)`` may return a context manager wrapped around that step (FLOP counter,
    profiler); it is entered after the clock starts and left before it stops, on the step's own thread.
    """

    def __init__(
        self,
        names: Sequence[str],
        instrument: Callable[[int, int], contextlib.AbstractContextManager[Any] | None] | None = None,
        timeout: float = 7200.0,
    ) -> None:
        self.names = list(names)
        self.times: list[list[float]] = [[] for _ in names]
        self.phases: list[list[dict[str, float]]] = [[] for _ in names]
        self.instrument = instrument
        self.timeout = timeout
        self._cond = threading.Condition()
        self._turn = 0
        self._holder: tuple[int, int] | None = None  # (path, thread id) holding the turn
        self._active = set(range(len(names)))
        self._waiting: set[int] = set()
        self._errors: list[str] = []
        self._open: dict[int, tuple[float, contextlib.ExitStack, PhaseClock | None]] = {}
        self.clocks: dict[int, Callable[[], PhaseClock]] = {}

    def _next(self, path: int) -> int:
        n = len(self.names)
        for d in range(1, n + 1):
            if (path + d) % n in self._active:
                return (path + d) % n
        return path

    def _release(self) -> None:
        holder = self._holder
        if holder is not None and holder[1] == threading.get_ident():
            self._holder = None
            self._turn = self._next(holder[0])
            self._cond.notify_all()

    def begin(self, path: int) -> None:
        with self._cond:
            self._release()
            self._waiting.add(path)
            self._cond.notify_all()
            ok = self._cond.wait_for(
                lambda: self._errors or (self._turn == path and self._holder is None), self.timeout
            )
            self._waiting.discard(path)
            if self._errors:
                raise RuntimeError(f"{self.names[path]}: stopped because another path failed: {self._errors}")
            if not ok:
                raise TimeoutError(f"{self.names[path]}: waited {self.timeout} s for its turn")
            self._holder = (path, threading.get_ident())
        stack = contextlib.ExitStack()
        clock = self.clocks[path]() if path in self.clocks else None
        start = time.perf_counter()
        if clock is not None:
            stack.enter_context(clock)
        extra = self.instrument(path, len(self.times[path])) if self.instrument else None
        if extra is not None:
            stack.enter_context(extra)
        self._open[path] = (start, stack, clock)

    def end(self, path: int) -> None:
        start, stack, clock = self._open.pop(path)
        stack.close()
        elapsed = time.perf_counter() - start
        self.times[path].append(elapsed)
        if clock is not None:
            self.phases[path].append(clock.split(elapsed))

    def finish(self, path: int, error: BaseException | None = None) -> None:
        """The loop of ``path`` is over (or failed): it takes no more turns."""
        with self._cond:
            if path in self._open:  # failed inside a step
                self._open.pop(path)[1].close()
            if error is not None and path in self._active:
                self._errors.append(f"{self.names[path]}: {type(error).__name__}: {error}")
            self._active.discard(path)
            if self._holder is not None and self._holder[0] == path:
                self._holder = None
            if self._turn == path:
                self._turn = self._next(path)
            self._cond.notify_all()

    def raise_errors(self) -> None:
        if self._errors:
            raise RuntimeError("a training loop failed: " + "; ".join(self._errors))

    def wait_until_waiting(self, path: int) -> None:
        """Block until ``path``'s loop has finished its set-up and waits for its first turn (or failed)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: path in self._waiting or path not in self._active or self._errors, self.timeout
            )
            if self._errors:
                raise RuntimeError(f"set-up failed: {self._errors}")
            if not ok:
                raise TimeoutError(f"{self.names[path]}: no first step within {self.timeout} s")


class PhaseClock:
    """Wall time of a step's phases: generation, training forward, backward, optimiser step; the rest is "other".

    Installed for one step (forward hooks on the model, a wrapper on the rollout method, global optimiser
    hooks, a wrapper on ``Tensor.backward``) and removed afterwards. Forward calls made while generating
    count as generation.
    """

    def __init__(self, model: torch.nn.Module, gen_owner: object, gen_attr: str) -> None:
        self.model, self.gen_owner, self.gen_attr = model, gen_owner, gen_attr
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> PhaseClock:
        self.seconds = dict.fromkeys(PHASES[:-1], 0.0)
        self._generating = 0
        self._starts: dict[str, float] = {}
        clock = self
        original = getattr(self.gen_owner, self.gen_attr)
        self._shadowed = self.gen_attr in vars(self.gen_owner)
        self._original = original

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            clock._generating += 1
            try:
                return original(*args, **kwargs)
            finally:
                clock._generating -= 1
                clock.seconds["generate"] += time.perf_counter() - start

        setattr(self.gen_owner, self.gen_attr, timed_generate)
        backward = torch.Tensor.backward

        def timed_backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            try:
                backward(tensor, *args, **kwargs)
            finally:
                clock.seconds["backward"] += time.perf_counter() - start

        self._backward = backward
        torch.Tensor.backward = timed_backward  # type: ignore[method-assign]
        self._handles = [
            self.model.register_forward_pre_hook(lambda *_: self._mark("train forward")),
            self.model.register_forward_hook(lambda *_: self._stop("train forward")),
            register_optimizer_step_pre_hook(lambda *_: self._mark("optimizer")),
            register_optimizer_step_post_hook(lambda *_: self._stop("optimizer")),
        ]
        return self

    def _mark(self, phase: str) -> None:
        if not self._generating:
            self._starts[phase] = time.perf_counter()

    def _stop(self, phase: str) -> None:
        start = self._starts.pop(phase, None)
        if start is not None:
            self.seconds[phase] += time.perf_counter() - start

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        torch.Tensor.backward = self._backward  # type: ignore[method-assign]
        if self._shadowed:
            setattr(self.gen_owner, self.gen_attr, self._original)
        else:
            delattr(self.gen_owner, self.gen_attr)

    def split(self, total: float) -> dict[str, float]:
        out = dict(self.seconds)
        out["other"] = max(0.0, total - sum(out.values()))
        return out


# ---------------------------------------------------------------------------------------------------
# FLOPs, peak, profile
# ---------------------------------------------------------------------------------------------------
def _cpu_flash_attention_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """QKᵀ and PV of ``_scaled_dot_product_flash_attention_for_cpu`` (torch's counter only knows the GPU
    kernels); a causal mask is not discounted, as torch's own formulas do not discount it either."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[2] * (d + value[3])


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args: Any, **kwargs: Any) -> int:
    return 2 * _cpu_flash_attention_flops(query, key, value)


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
        },
    )


class CountFlops:
    """A FLOP counter around one step; the total lands in ``flops[name]``."""

    def __init__(self, flops: dict[str, int], name: str) -> None:
        self.flops, self.name = flops, name
        self.mode = flop_counter()

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        self.flops[self.name] = int(self.mode.get_total_flops())


class Profile:
    """``torch.profiler`` around one step; the top operators by self CPU time land in ``tables[name]``."""

    def __init__(self, tables: dict[str, str], name: str, rows: int = 15) -> None:
        self.tables, self.name, self.rows = tables, name, rows
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def __enter__(self) -> None:
        self.prof.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.prof.__exit__(*exc)
        self.tables[self.name] = self.prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=self.rows, max_name_column_width=60
        )


def peak_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a ``size``² matmul (2·size³ FLOPs) in this process and thread count."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


class Peaks:
    """Matmul peaks (float32 and bfloat16), measured several times during the run; the best counts."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        self.measure()

    def measure(self) -> None:
        self.seen["float32"].append(peak_matmul_flops(torch.float32))
        self.seen["bfloat16"].append(peak_matmul_flops(torch.bfloat16))

    def best(self, dtype: str) -> float:
        return max(self.seen[dtype])

    def describe(self, dtype: str) -> str:
        values = self.seen[dtype]
        return f"{min(values) / 1e9:.1f} – {max(values) / 1e9:.1f} GFLOP/s"


# ---------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------
def image_sample(i: int, size: int) -> dict[str, Any]:
    """A 2D grey image (voxel frame: axis 0 = x) with one bright square and its box."""
    img = torch.full((1, size, size), 0.15)
    x0, y0 = size // 8 + 9 * i, size // 4 + 5 * i
    side = size // 4
    img[0, x0 : x0 + side, y0 : y0 + side] = 0.85
    return {
        "id": f"square/{i}",
        "text": f"the bright square number {i}",
        "image": img,
        "frame": CoordinateFrame((size, size)),
        "boxes": np.asarray([[x0, y0, x0 + side, y0 + side]]),
        "spacing": None,
    }


def volume_sample(i: int, tokens: int, side: int = 140) -> dict[str, Any]:
    """A noisy volume with a bright cube whose video has exactly ``tokens`` merged vision tokens."""
    per_slice_pair = (side // 28) ** 2  # merged tokens of one temporal patch (2 slices) of side² pixels
    if tokens % per_slice_pair:
        raise SystemExit(f"--tokens {tokens}: must be a multiple of {per_slice_pair} ({side}² px slices)")
    depth = 2 * tokens // per_slice_pair
    gen = torch.Generator().manual_seed(1000 + i)
    vol = 0.2 + 0.05 * torch.rand(1, side, side, depth, generator=gen)
    x0, z0 = 30 + 7 * i, depth // 4
    vol[0, x0 : x0 + 40, 40:80, z0 : z0 + max(2, depth // 4)] = 0.8
    box = [x0, 40, z0, x0 + 40, 80, z0 + max(2, depth // 4)]
    return {
        "id": f"cube/{i}",
        "text": f"the bright cube number {i}",
        "image": vol,
        "frame": CoordinateFrame((side, side, depth)),
        "boxes": np.asarray([box]),
        "spacing": None,
    }


def check_vision_tokens(batch_inputs: dict[str, torch.Tensor], expected: int) -> None:
    counts = (batch_inputs["mm_token_type_ids"] > 0).sum(dim=1).tolist()
    if any(c != expected for c in counts):
        raise SystemExit(f"prompts hold {counts} vision tokens, expected {expected} each")


def trl_rows(samples: Sequence[dict[str, Any]], policy: Any, template: str) -> list[dict[str, Any]]:
    """The 2D samples as a TRL dataset: conversational prompt + PIL image + the reward's columns."""
    from PIL import Image

    from mg3d.prompts import build_messages

    rows = []
    for s in samples:
        # voxel frame (x, y) → a display image of rows × columns
        grey = (s["image"][0].numpy().T * 255).round().astype(np.uint8)
        rows.append(
            {
                "prompt": build_messages(
                    s["text"], 2, template=template, codec=policy.codec, record_id=s["id"]
                ),
                "image": Image.fromarray(grey).convert("RGB"),
                "boxes": s["boxes"].tolist(),
                "id": s["id"],
                "text": s["text"],
            }
        )
    return rows


def check_same_prompts(mg3d_inputs: dict[str, torch.Tensor], processor: Any, rows: Sequence[dict]) -> int:
    """TRL's tokenisation of the rows (its own message preparation) must give mg3d's prompt ids exactly."""
    from trl.data_utils import prepare_multimodal_messages

    ids = mg3d_inputs["input_ids"]
    mask = mg3d_inputs["attention_mask"].bool()
    for i, row in enumerate(rows):
        messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
        trl_ids = processor.apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        ours = ids[i][mask[i]].tolist()
        if list(trl_ids) != ours:
            raise SystemExit(
                f"prompt {row['id']}: TRL tokenises to {len(trl_ids)} ids, mg3d to {len(ours)}; they must be equal"
            )
    return int(mask.sum(dim=1).max())


# ---------------------------------------------------------------------------------------------------
# the two training loops
# ---------------------------------------------------------------------------------------------------
def mg3d_module(
    args: argparse.Namespace, *, generations: int, max_vision_tokens: int, lean: bool = False
) -> Any:
    """``GRPOModule`` with its defaults except what both sides must share (G, lengths, reward, loss, lr).

    ``lean``: the opt-in speed-ups of issue 23 that pay on CPU, the lean decoder (``RolloutConfig.decoder``) and
    fused AdamW (``OptimConfig.fused``)."""
    from mg3d.generation import RolloutConfig
    from mg3d.grounding import PromptConfig
    from mg3d.grpo.config import EvalConfig, OptimConfig
    from mg3d.grpo.loss import GRPOLossConfig
    from mg3d.grpo.module import GRPOModule
    from mg3d.model import PolicyConfig

    return GRPOModule(
        policy=PolicyConfig(seed=0),
        prompt=PromptConfig(template=args.template, max_vision_tokens=max_vision_tokens),
        rollout=RolloutConfig(
            num_generations=generations,
            max_new_tokens=args.max_new_tokens,
            decoder="lean" if lean else "transformers",
        ),
        loss=GRPOLossConfig(loss_type="dapo", beta=0.0),
        rewards={"iou": 1.0},
        optim=OptimConfig(lr=args.lr, schedule="linear", max_grad_norm=1.0, fused=lean),
        evaluation=EvalConfig(enabled=False),
        log_completions_every_n_steps=0,
    )


class _SameBatch(torch.utils.data.Dataset):
    """The same list of samples, ``n`` times (every step sees the same prompts)."""

    def __init__(self, samples: list[dict[str, Any]], n: int) -> None:
        self.samples, self.n = samples, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return self.samples


def _as_is(batch: Any) -> Any:
    return batch


def lightning_turns(
    lockstep: Lockstep, path_of: Callable[[int], int], on_batch: Callable[[Any, int], None] | None = None
) -> Any:
    """A Lightning callback that times each training batch as one step of path ``path_of(batch_idx)``;
    ``on_batch(module, batch_idx)`` runs first, outside the timing."""
    import lightning.pytorch as pl

    class Turns(pl.Callback):
        def __init__(self) -> None:
            self.path = 0
            self.lengths: dict[int, list[float]] = {}

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            self.path = path_of(batch_idx)
            if on_batch is not None:
                on_batch(module, batch_idx)
            lockstep.begin(self.path)

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            lockstep.end(self.path)
            length = trainer.callback_metrics.get("train/completions/mean_length")
            self.lengths.setdefault(self.path, []).append(float("nan") if length is None else float(length))

    return Turns()


def fit(
    module: Any,
    samples: list[dict[str, Any]],
    steps: int,
    callback: Any,
    paths: Sequence[int],
    lockstep: Lockstep,
    precision: str = "32-true",
) -> None:
    """Train ``module`` for ``steps`` optimiser steps on the same batch inside a Lightning ``Trainer``."""
    import lightning.pytorch as pl

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=tmp,
            callbacks=[callback],
            precision=precision,
        )
        loader = torch.utils.data.DataLoader(_SameBatch(samples, steps), batch_size=None, collate_fn=_as_is)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except BaseException as err:
            for p in paths:
                lockstep.finish(p, err)
            raise
        for p in paths:
            lockstep.finish(p)


def trl_trainer(
    policy: Any, rows: list[dict[str, Any]], args: argparse.Namespace, *, steps: int, defaults: bool, out: str
) -> Any:
    """TRL's GRPOTrainer on the same model, prompts, reward, loss and optimiser settings as the mg3d side."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mg3d.rewards import RewardSet
    from mg3d.rewards.trl_adapter import trl_reward_functions
    from mg3d.trl_processor import trl_image_processor

    rewards = RewardSet.from_config({"iou": 1.0}, codec=policy.codec_name, parse_mode="lenient")
    funcs, weights = trl_reward_functions(rewards, image_processor=policy.processor)
    # TRL's defaults are bf16 autocast and activation checkpointing; the like-for-like path switches both off.
    precision = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    config = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=len(rows) * args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        loss_type="dapo",
        beta=0.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        reward_weights=weights,
        seed=0,
        **precision,
    )
    return GRPOTrainer(
        model=policy.model,
        processing_class=trl_image_processor(policy),
        reward_funcs=funcs,
        args=config,
        train_dataset=Dataset.from_list(rows),
    )


def trl_turns(lockstep: Lockstep, path: int) -> Any:
    from transformers import TrainerCallback

    class Turns(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lockstep.begin(path)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            lockstep.end(path)

    return Turns()


def _in_thread(loop: Callable[[], None], lockstep: Lockstep, path: int, threads: int) -> threading.Thread:
    """Start a training loop in a worker thread; its errors reach the other loops through the lockstep."""

    def target() -> None:
        torch.set_num_threads(threads)  # a per-thread setting under OpenMP
        try:
            loop()
        except BaseException as err:  # reported through the lockstep, re-raised by the main thread
            lockstep.finish(path, err)
            return
        lockstep.finish(path)

    thread = threading.Thread(target=target, name=lockstep.names[path])
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PathStats:
    """The timed steps of one path, with the FLOPs of its (untimed) first step."""

    name: str
    times: list[float]
    phases: list[dict[str, float]]
    lengths: list[float]
    flops: int | None
    prompt_tokens: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def phase(self, name: str) -> float:
        return statistics.median(p[name] for p in self.phases) if self.phases else float("nan")

    @property
    def mean_length(self) -> float:
        values = [v for v in self.lengths if v == v]
        return float(np.mean(values)) if values else float("nan")


def per_step_ratio(num: PathStats, den: PathStats) -> float:
    """Median of the per-step ratios (steps k of both paths ran back to back)."""
    return statistics.median(a / b for a, b in zip(num.times, den.times))


class Plan:
    """Which step of each path counts FLOPs (the first), which are timed, which one is profiled."""

    def __init__(self, names: Sequence[str], warmup: int, runs: int, profile: bool) -> None:
        if warmup < 1:
            raise SystemExit("--warmup must be >= 1 (the first step counts FLOPs and is not timed)")
        self.names, self.warmup, self.runs, self.profile = list(names), warmup, runs, profile
        self.flops: dict[str, int] = {}
        self.tables: dict[str, str] = {}

    @property
    def steps(self) -> int:
        return self.warmup + self.runs + int(self.profile)

    def instrument(self, path: int, step: int) -> contextlib.AbstractContextManager[Any] | None:
        if step == 0:
            return CountFlops(self.flops, self.names[path])
        if self.profile and step == self.warmup + self.runs:
            return Profile(self.tables, self.names[path])
        return None

    def stats(self, lockstep: Lockstep, path: int, lengths: Sequence[float], prompt_tokens: int) -> PathStats:
        timed = slice(self.warmup, self.warmup + self.runs)
        return PathStats(
            self.names[path],
            lockstep.times[path][timed],
            lockstep.phases[path][timed],
            list(lengths)[timed],
            self.flops.get(self.names[path]),
            prompt_tokens,
        )


MG3D = "mg3d GRPOModule"
TRL = "TRL GRPOTrainer"
MG3D_LEAN = "mg3d GRPOModule, lean decoder + fused AdamW"
MG3D_BF16 = "mg3d GRPOModule, Lightning bf16-mixed (dynamic cache)"
TRL_DEFAULTS = "TRL GRPOTrainer, TRL defaults (bf16 autocast, checkpointing)"
SHORT = {
    MG3D: "mg3d",
    TRL: "TRL",
    MG3D_LEAN: "mg3d\nlean+fused",
    MG3D_BF16: "mg3d\nbf16-mixed",
    TRL_DEFAULTS: "TRL\ndefaults (bf16)",
}


@dataclasses.dataclass
class Loop:
    """One path's training loop: how to run it, how to time its phases, where its completion lengths are."""

    run: Callable[[], None]
    clock: Callable[[], PhaseClock]
    lengths: Callable[[], list[float]]


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process (to show that the compiled paths did compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def mg3d_loop(args: argparse.Namespace, samples: list, plan: Plan, lockstep: Lockstep, path: int) -> Loop:
    lean = lockstep.names[path] == MG3D_LEAN
    module = mg3d_module(args, generations=args.generations, max_vision_tokens=1024, lean=lean)
    bf16 = lockstep.names[path] == MG3D_BF16
    if bf16:  # the static cache is allocated in float32 and refuses autocast's bf16 keys
        module.rollout_config = dataclasses.replace(module.rollout_config, cache_implementation="dynamic")
    callback = lightning_turns(lockstep, path_of=lambda _: path)
    precision = "bf16-mixed" if bf16 else "32-true"
    return Loop(
        run=functools.partial(fit, module, samples, plan.steps, callback, [path], lockstep, precision),
        clock=lambda: PhaseClock(module.model, module._rollout_backend(), "generate"),
        lengths=lambda: callback.lengths.get(path, []),
    )


def trl_loop(
    args: argparse.Namespace, rows: list, plan: Plan, lockstep: Lockstep, path: int, out: str
) -> Loop:
    from transformers import PrinterCallback

    from mg3d.model import PolicyConfig

    policy = PolicyConfig(seed=0).build()  # the same weights as the mg3d modules'
    trainer = trl_trainer(
        policy, rows, args, steps=plan.steps, defaults=lockstep.names[path] == TRL_DEFAULTS, out=out
    )
    trainer.remove_callback(PrinterCallback)  # it prints every step's log dict
    trainer.add_callback(trl_turns(lockstep, path))
    return Loop(
        run=trainer.train,
        clock=lambda: PhaseClock(trainer.model, trainer, "_generate_single_turn"),
        lengths=lambda: [  # logged every step (train() starts a new state: read it afterwards)
            float(h["completions/mean_length"])
            for h in trainer.state.log_history
            if "completions/mean_length" in h
        ],
    )


def run_2d(args: argparse.Namespace) -> tuple[list[PathStats], dict[str, str]]:
    """mg3d (Lightning) and TRL loops on the same 2D prompts, in lockstep; the first runs in this thread."""
    from mg3d.grounding import GroundingPrompter
    from mg3d.model import PolicyConfig
    from mg3d.trl_processor import trl_image_processor

    names = (
        [MG3D, TRL] + ([MG3D_LEAN] if args.lean else []) + ([MG3D_BF16, TRL_DEFAULTS] if args.bf16 else [])
    )
    plan = Plan(names, args.warmup, args.runs, args.profile != "never")
    lockstep = Lockstep(names, plan.instrument)
    samples = [image_sample(i, args.image_size) for i in range(args.batch)]
    policy = PolicyConfig(seed=0).build()
    mg3d_inputs = GroundingPrompter(policy, template=args.template).build(samples).inputs
    check_vision_tokens(mg3d_inputs, (args.image_size // 28) ** 2)
    rows = trl_rows(samples, policy, args.template)
    prompt_tokens = check_same_prompts(mg3d_inputs, trl_image_processor(policy), rows)
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        loops = [
            mg3d_loop(args, samples, plan, lockstep, p)
            if name.startswith("mg3d")
            else trl_loop(args, rows, plan, lockstep, p, f"{tmp}/{p}")
            for p, name in enumerate(names)
        ]
        for p, loop in enumerate(loops):
            lockstep.clocks[p] = loop.clock
        threads = []
        for p in range(1, len(names)):
            threads.append(_in_thread(loops[p].run, lockstep, p, args.threads))
            lockstep.wait_until_waiting(p)  # set-ups one after the other, never beside a step
        try:
            loops[0].run()
        finally:
            for thread in threads:
                thread.join()
    lockstep.raise_errors()
    return [
        plan.stats(lockstep, p, loops[p].lengths(), prompt_tokens) for p in range(len(names))
    ], plan.tables


@dataclasses.dataclass
class Config3D:
    tokens: int
    generations: int
    shared: PathStats
    repeated: PathStats
    tables: dict[str, str]
    lean: PathStats | None = None  # shared prompt with the lean decoder and fused AdamW

    @property
    def speedup(self) -> float:
        return per_step_ratio(self.repeated, self.shared)

    @property
    def lean_speedup(self) -> float | None:
        return per_step_ratio(self.repeated, self.lean) if self.lean else None

    @property
    def best_speedup(self) -> float:
        return max(self.speedup, self.lean_speedup or 0.0)


def run_3d(args: argparse.Namespace, tokens: int, generations: int, profile: bool) -> Config3D:
    """One Lightning loop whose steps take turns: shared prompt, repeated prompt (and, with ``--lean``, shared
    prompt with the lean decoder and fused AdamW) on the same volume prompts."""
    suffix = f" (N={tokens}, G={generations})"
    names = [f"shared prompt{suffix}", f"repeated prompt{suffix}"]
    if args.lean:
        names.append(f"shared prompt, lean decoder + fused AdamW{suffix}")
    n = len(names)
    plan = Plan(names, args.warmup, args.runs, profile)
    samples = [volume_sample(i, tokens) for i in range(args.batch_3d)]
    module = mg3d_module(args, generations=generations, max_vision_tokens=tokens)
    inputs = module.prompter.build(samples).inputs
    check_vision_tokens(inputs, tokens)
    lockstep = Lockstep(names, plan.instrument)
    for path in range(n):
        lockstep.clocks[path] = lambda: PhaseClock(module.model, module._rollout_backend(), "generate")

    def on_batch(mod: Any, batch_idx: int) -> None:
        # Step k of every path samples with the same seed: the same completions (the shared prefill is exact,
        # the lean decoder draws the same tokens up to rare near-ties), so the paths differ only in how the
        # work is done.
        path = batch_idx % n
        lean = path == 2
        mod.rollout_config = dataclasses.replace(
            mod.rollout_config, share_prompt=path != 1, decoder="lean" if lean else "transformers"
        )
        mod._rollout_backend().generator.manual_seed(batch_idx // n)
        for group in mod.trainer.optimizers[0].param_groups:  # torch reads the flag at every step
            group["fused"] = True if lean else None

    callback = lightning_turns(lockstep, path_of=lambda i: i % n, on_batch=on_batch)
    fit(module, samples, n * plan.steps, callback, list(range(n)), lockstep)
    prompt_tokens = int(inputs["attention_mask"].sum(dim=1).max())
    stats = [plan.stats(lockstep, p, callback.lengths.get(p, []), prompt_tokens) for p in range(n)]
    return Config3D(tokens, generations, stats[0], stats[1], plan.tables, stats[2] if args.lean else None)


# ---------------------------------------------------------------------------------------------------
# the real-architecture Qwen2.5-VL folder (151,936-row vocabulary): generation speed, LM head vs body
# ---------------------------------------------------------------------------------------------------
class HeadClock:
    """Wall time inside the model's forward calls and inside its LM head during one rollout (forward hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.head = model, model.get_output_embeddings()
        self.forward = self.lm_head = 0.0
        self.calls = 0

    def __enter__(self) -> HeadClock:
        starts: dict[str, float] = {}

        def mark(key: str) -> Callable[..., None]:
            return lambda *_: starts.__setitem__(key, time.perf_counter())

        def stop(key: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                elapsed = time.perf_counter() - starts.pop(key)
                if key == "head":
                    self.lm_head += elapsed
                else:
                    self.forward += elapsed
                    self.calls += 1

            return hook

        self._handles = [
            self.model.register_forward_pre_hook(mark("model")),
            self.model.register_forward_hook(stop("model")),
            self.head.register_forward_pre_hook(mark("head")),
            self.head.register_forward_hook(stop("head")),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


@dataclasses.dataclass
class RealRun:
    """Median seconds of one rollout of each variant on the real-architecture folder, and what it held."""

    variants: dict[str, dict[str, float]]
    rows: int
    prompt_tokens: int
    new_tokens: int
    vocab: int
    hidden: int
    layers: int
    compile_seconds: float
    rows_differing: int  # rows the compiled variant drew differently from the eager one, over all rollouts
    rows_differing_lean: int  # the same for the lean decoder
    rollouts: int


def run_real(args: argparse.Namespace) -> RealRun:
    """Rollouts (B prompts × G, sampled, as GRPO samples them) on the real-architecture folder: eager as built
    with the inverse-CDF sampler, then also with compiled decoding or the lean decoder, alternating call by call;
    the first call of each is untimed (the compiled one pays its compilation there)."""
    from mg3d.generation import RolloutConfig, generate_completions
    from mg3d.grounding import GroundingPrompter
    from mg3d.model import load_policy
    from mg3d.testing import real_architecture_folder

    policy = load_policy(real_architecture_folder())
    samples = [image_sample(i, args.image_size) for i in range(args.real_batch)]
    inputs = GroundingPrompter(policy, template=args.template).build(samples).inputs
    text = policy.model.config.get_text_config()
    base = RolloutConfig(num_generations=args.generations, max_new_tokens=args.max_new_tokens)
    fast = dataclasses.replace(base, sampler="inverse_cdf")
    configs = {
        "as built (transformers' multinomial)": base,
        "inverse-CDF sampler": fast,
        "inverse-CDF sampler + compiled decoding": dataclasses.replace(fast, compile=True),
        "inverse-CDF sampler + lean decoder": dataclasses.replace(fast, decoder="lean"),
    }
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    tokens: dict[str, list[torch.Tensor]] = {name: [] for name in configs}
    compile_seconds = 0.0
    for step in range(args.warmup + args.runs):
        for name, config in configs.items():
            config = dataclasses.replace(config, seed=step)
            # Hooks would change what dynamo traces (and recompile), and the lean decoder calls no lm_head module
            # (its weights are packed): those two variants are timed as a whole.
            clock = HeadClock(policy.model) if not config.compile and config.decoder != "lean" else None
            start = time.perf_counter()
            with clock or contextlib.nullcontext():
                rollout = generate_completions(policy, inputs, config)
            total = time.perf_counter() - start
            tokens[name].append(rollout.completion_ids)
            if step == 0 and config.compile:
                compile_seconds = total
            if step < args.warmup:
                continue
            nan = float("nan")
            seconds[name].append(
                {
                    "total": total,
                    "lm_head": clock.lm_head if clock else nan,
                    "body": clock.forward - clock.lm_head if clock else nan,
                    "outside": total - clock.forward if clock else nan,
                    "steps": float(rollout.completion_ids.shape[1]),  # decoding steps of the longest row
                }
            )
        print(f"[real] rollout {step + 1}/{args.warmup + args.runs}", file=sys.stderr, flush=True)
    drawn = list(tokens.values())  # the compiled / lean variants against the eager one with the same sampler
    differ = sum(int((a != b).any(dim=1).sum()) for a, b in zip(drawn[1], drawn[2]))
    differ_lean = sum(int((a != b).any(dim=1).sum()) for a, b in zip(drawn[1], drawn[3]))
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in seconds.items()
    }
    return RealRun(
        variants=medians,
        rows=int(inputs["input_ids"].shape[0]) * args.generations,
        prompt_tokens=int(inputs["attention_mask"].sum(dim=1).max()),
        new_tokens=args.max_new_tokens,
        vocab=int(text.vocab_size),
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        compile_seconds=compile_seconds,
        rows_differing=differ,
        rows_differing_lean=differ_lean,
        rollouts=args.warmup + args.runs,
    )


def report_real(run: RealRun, args: argparse.Namespace) -> list[str]:
    lines = [
        "### Generation at the real vocabulary (real-architecture Qwen2.5-VL folder)",
        "",
        f"`mg3d.testing.real_architecture_folder()`: vocabulary {run.vocab:,}, hidden size {run.hidden}, "
        f"{run.layers} layers (small random weights, the released tokenizer and 3B vision geometry). "
        f"{args.real_batch} image prompts of ≤ {run.prompt_tokens} tokens × G = {args.generations} = {run.rows} "
        f"rows, ≤ {run.new_tokens} new tokens sampled at T = 1; median of {args.runs} rollouts after "
        f"{args.warmup} untimed; the variants alternate call by call, with the same seeds. The compiled variant "
        f"drew other tokens than the eager one with the same sampler in {run.rows_differing} of "
        f"{run.rows * run.rollouts} rows (inductor's fused kernels round differently), the lean decoder in "
        f"{run.rows_differing_lean} (its attention and packed products round differently); the inverse-CDF sampler "
        "draws from the same distribution as `multinomial` from another random stream. LM head = time inside "
        "`lm_head` (forward hooks), body = the rest of the model's forward calls, outside = generate's own loop "
        "(logits processors, sampling, stopping, bookkeeping) and the prompt preparation.",
        "",
        "| variant | rollout (s) | tokens per row | tokens/s (rows × tokens / rollout) | LM head (s) | body (s) "
        "| outside the model (s) | LM head share of the model's time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in run.variants.items():
        rate = run.rows * m["steps"] / m["total"]
        timed = m["lm_head"] == m["lm_head"]  # not NaN: the eager variant, timed by hooks
        forward = m["lm_head"] + m["body"]
        cells = (
            [
                f"{m['lm_head']:.3f}",
                f"{m['body']:.3f}",
                f"{m['outside']:.3f}",
                f"{100 * m['lm_head'] / forward:.0f} %",
            ]
            if timed
            else ["–", "–", "–", "– (timed as a whole)"]
        )
        lines.append(
            f"| {name} | {_s(m['total'])} | {m['steps']:.0f} | {rate:.0f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"The compiled variant's first rollout (compilation included) took {run.compile_seconds:.1f} s; dynamo "
        f"compiled {compiled_graphs()} distinct graph(s) in the process by the end.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.2f}"


def _mfu(stats: PathStats, peaks: Peaks) -> tuple[str, str, str]:
    """GFLOP per step, achieved GFLOP/s and the fraction of the matmul peak of the path's compute dtype."""
    if not stats.flops:
        return "–", "–", "–"
    rate = stats.flops / stats.median
    dtype = "bfloat16" if stats.name in (MG3D_BF16, TRL_DEFAULTS) else "float32"
    mark = " (of bf16 peak)" if dtype == "bfloat16" else ""
    return f"{stats.flops / 1e9:.1f}", f"{rate / 1e9:.2f}", f"{100 * rate / peaks.best(dtype):.1f} %{mark}"


def _phases(stats: PathStats) -> str:
    return " | ".join(_s(stats.phase(p)) for p in PHASES)


def machine() -> str:
    import lightning
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}, lightning {lightning.__version__}"
    )


def report_2d(
    stats: list[PathStats], tables: dict[str, str], peaks: Peaks, args: argparse.Namespace
) -> list[str]:
    by_name = {st.name: st for st in stats}
    mg3d, trl = stats[0], stats[1]
    r = per_step_ratio(mg3d, trl)
    lines = [
        "### 2D image prompts: mg3d `GRPOModule` vs TRL `GRPOTrainer`",
        "",
        f"Prompts: {mg3d.prompt_tokens} tokens each ({(args.image_size // 28) ** 2} vision tokens of a "
        f"{args.image_size}² image; TRL's tokenisation checked equal to mg3d's, id for id); "
        f"{args.batch} prompts × G = {args.generations} per step.",
        "",
        "| path | step, median (s) | min – max (s) | × mg3d | " + " (s) | ".join(PHASES) + " (s) "
        "| mean completion length | GFLOP / step | GFLOP/s | MFU |",
        "|---" * (8 + len(PHASES)) + "|",
    ]
    for st in stats:
        gf, rate, mfu = _mfu(st, peaks)
        rel = "1" if st is mg3d else f"{per_step_ratio(st, mg3d):.2f}"
        lines.append(
            f"| {st.name} | **{_s(st.median)}** | {_s(min(st.times))} – {_s(max(st.times))} | {rel} | "
            f"{_phases(st)} | {st.mean_length:.1f} | {gf} | {rate} | {mfu} |"
        )
    met = r <= TARGET_2D
    lines += [
        "",
        f"**mg3d / TRL step time = {r:.2f}×** (both float32, no checkpointing; median of per-step ratios; "
        f"target ≤ {TARGET_2D}×: {'met' if met else 'missed'}).",
    ]
    if MG3D_LEAN in by_name:
        lean = per_step_ratio(by_name[MG3D_LEAN], trl)
        met = met or lean <= TARGET_2D
        lines.append(
            f"With the lean decoder and fused AdamW: mg3d / TRL = **{lean:.2f}×** "
            f"(target ≤ {TARGET_2D}×: {'met' if lean <= TARGET_2D else 'missed'}); "
            f"against mg3d as built: {per_step_ratio(by_name[MG3D_LEAN], mg3d):.2f}×."
        )
    if MG3D_BF16 in by_name and TRL_DEFAULTS in by_name:
        bf16 = per_step_ratio(by_name[MG3D_BF16], by_name[TRL_DEFAULTS])
        lines.append(
            f"With bf16 autocast on both sides: mg3d (bf16-mixed) / TRL (its defaults) = **{bf16:.2f}×**; "
            f"mg3d float32 / TRL defaults = {per_step_ratio(mg3d, by_name[TRL_DEFAULTS]):.2f}×."
        )
    if tables and (args.profile == "always" or (args.profile == "auto" and not met)):
        lines += _profile_lines(tables)
    return lines


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"**{value:.2f}×**"


def report_3d(configs: list[Config3D], peaks: Peaks, profile: str) -> list[str]:
    lean = any(c.lean for c in configs)
    lines = [
        "### 3D volume prompts: prompt shared (as built) vs repeated G times",
        "",
        "| vision tokens | G | prompt tokens | shared (s) | repeated (s) | **speed-up** | "
        + ("shared, lean + fused (s) | **its speed-up** | " if lean else "")
        + "shared GFLOP / step | repeated GFLOP / step | shared MFU | repeated MFU | "
        + ("lean + fused MFU | " if lean else "")
        + "mean completion length (shared / repeated) |",
        "|---" * (11 + 3 * lean) + "|",
    ]
    for c in configs:
        sg, _, sm = _mfu(c.shared, peaks)
        rg, _, rm = _mfu(c.repeated, peaks)
        extra = (
            f"{_s(c.lean.median)} | {_ratio(c.lean_speedup)} | " if c.lean else ("– | – | " if lean else "")
        )
        lean_mfu = f"{_mfu(c.lean, peaks)[2]} | " if c.lean else ("– | " if lean else "")
        lines.append(
            f"| {c.tokens} | {c.generations} | {c.shared.prompt_tokens} | {_s(c.shared.median)} | "
            f"{_s(c.repeated.median)} | {_ratio(c.speedup)} | {extra}{sg} | {rg} | {sm} | {rm} | {lean_mfu}"
            f"{c.shared.mean_length:.1f} / {c.repeated.mean_length:.1f} |"
        )
    lines += ["", "Phases (median seconds per step):", ""]
    lines.append("| vision tokens | G | path | " + " | ".join(PHASES) + " |")
    lines.append("|---" * (3 + len(PHASES)) + "|")
    for c in configs:
        paths = [(c.shared, "shared"), (c.repeated, "repeated")] + (
            [(c.lean, "shared, lean + fused")] if c.lean else []
        )
        for st, label in paths:
            lines.append(f"| {c.tokens} | {c.generations} | {label} | {_phases(st)} |")
    judged = [c for c in configs if c.tokens == TARGET_3D_TOKENS and c.generations in TARGET_3D]
    missed = False
    for c in judged:
        target = TARGET_3D[c.generations]
        met = c.best_speedup >= target
        missed |= not met
        lines += [
            "",
            f"N = {c.tokens}, G = {c.generations}: speed-up **{c.speedup:.2f}×** as built"
            + (f", **{c.lean_speedup:.2f}×** with the lean decoder + fused AdamW" if c.lean else "")
            + f" (target ≥ {target}×: {'met' if met else 'missed'}).",
        ]
    for c in (c for c in judged if c.generations == 8):
        best = max(
            (st for st in (c.shared, c.lean) if st and st.flops),
            key=lambda st: st.flops / st.median,
            default=None,
        )
        if best is not None:
            mfu = best.flops / best.median / peaks.best("float32")
            missed |= mfu < TARGET_MFU_3D
            lines += [
                "",
                f"MFU of the 3D step (N = {c.tokens}, G = 8, best mg3d path): **{100 * mfu:.1f} %** of the float32 "
                f"matmul peak (target ≥ {100 * TARGET_MFU_3D:.0f} %: {'met' if mfu >= TARGET_MFU_3D else 'missed'}).",
            ]
    tables = {k: v for c in configs for k, v in c.tables.items()}
    if tables and (profile == "always" or (profile == "auto" and missed)):
        lines += _profile_lines(tables)
    return lines


def _profile_lines(tables: dict[str, str]) -> list[str]:
    lines = ["", "Profile of one more step of each path (`torch.profiler`, top operators by self CPU time):"]
    for name, table in tables.items():
        lines += ["", f"{name}:", "", "```", table.rstrip(), "```"]
    return lines


def plot(
    path: Path, stats_2d: list[PathStats] | None, configs: list[Config3D], generations: int, g_tokens: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if stats_2d:
        labels = [SHORT.get(s.name, s.name) for s in stats_2d]
        bottom = np.zeros(len(stats_2d))
        for phase in PHASES:
            values = np.array([s.phase(phase) for s in stats_2d])
            ax.bar(labels, values, bottom=bottom, label=phase)
            bottom += values
        ax.set_ylabel("seconds per optimiser step (median)")
        ax.set_title(f"2D images, {stats_2d[0].prompt_tokens}-token prompts")
        ax.legend(fontsize=8)
    sweep = sorted((c for c in configs if c.generations == generations), key=lambda c: c.tokens)
    ax = axes[1]
    if sweep:
        xs = [c.tokens for c in sweep]
        ax.plot(xs, [c.repeated.median for c in sweep], "o-", label="prompt repeated G times")
        ax.plot(xs, [c.shared.median for c in sweep], "o-", label="prompt shared (mg3d)")
        if all(c.lean for c in sweep):
            ax.plot(xs, [c.lean.median for c in sweep], "s--", label="prompt shared, lean + fused")
        for c in sweep:
            ax.annotate(
                f"{c.speedup:.1f}×",
                (c.tokens, c.repeated.median),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
            )
        ax.margins(y=0.15)
        ax.set_xlabel("vision tokens per volume")
        ax.set_ylabel("seconds per optimiser step (median)")
        ax.set_title(f"3D volumes, G = {generations}")
        ax.legend(fontsize=8)
    gsweep = sorted((c for c in configs if c.tokens == g_tokens), key=lambda c: c.generations)
    ax = axes[2]
    if gsweep:
        ax.plot([c.generations for c in gsweep], [c.speedup for c in gsweep], "o-", label=f"N = {g_tokens}")
        if all(c.lean for c in gsweep):
            ax.plot(
                [c.generations for c in gsweep],
                [c.lean_speedup for c in gsweep],
                "s--",
                label=f"N = {g_tokens}, lean decoder + fused AdamW",
            )
        for g, target in TARGET_3D.items():
            ax.plot([g], [target], "k_", ms=14, label=f"target at G = {g}: {target:g}×")
        ax.set_xlabel("G (completions per prompt)")
        ax.set_ylabel("speed-up of sharing the prompt")
        ax.set_xticks([c.generations for c in gsweep])
        ax.set_title("3D: speed-up vs G")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def header(args: argparse.Namespace, peaks: Peaks, started: float, load_start: Sequence[float]) -> list[str]:
    """Machine, command and settings: what a reader needs to reproduce and to judge the numbers."""
    command = shlex.join(
        [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}", sys.executable, *sys.argv]
    )
    params = sum(p.numel() for p in mg3d_params()) / 1e6
    return [
        "## One GRPO optimiser step (`bench/grpo_step.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime(started))} on {machine()}; "
        f"{args.threads} torch thread(s); load average {load_start[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; {(time.time() - started) / 60:.1f} min in all. "
        f"Command: `{command}`.",
        "",
        f"Settings: tiny Qwen2.5-VL ({params:.2f} M parameters, seed 0), prompts × G completions per optimiser "
        f"step (2D: {args.batch} prompts, 3D: {args.batch_3d}), ≤ {args.max_new_tokens} new tokens sampled at "
        f"T = 1, `{args.template}` template, IoU reward, DAPO loss, β = 0, AdamW lr {args.lr:g} (linear "
        "schedule), max grad norm 1, float32 unless a path says bf16. Median of "
        f"{args.runs} timed steps per path after {args.warmup} untimed one(s); the paths take turns step by "
        "step; ratios are medians of per-step ratios.",
        "",
        "Peak matmul (2048², same process and thread count, measured before, between and after the parts): "
        f"float32 {peaks.describe('float32')}, bfloat16 {peaks.describe('bfloat16')}. MFU = matmul FLOPs of "
        "one step (counted by `FlopCounterMode` on the first, untimed step) / median step time / the best "
        "peak of the path's compute dtype.",
        "",
    ]


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="2d,3d,real", help="comma-separated: 2d, 3d, real")
    parser.add_argument("--batch", type=int, default=2, help="2D: prompts per generation batch (all paths)")
    parser.add_argument(
        "--batch-3d", type=int, default=1, help="3D: prompts per generation batch (both paths)"
    )
    parser.add_argument(
        "--generations", type=int, default=8, help="G of the 2D comparison and the token sweep"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--image-size", type=int, default=224, help="2D image side in pixels (multiple of 28)"
    )
    parser.add_argument("--tokens", default="250,500,1000,2000", help="3D: vision tokens per volume")
    parser.add_argument("--g-sweep", default="4,8,16", help="3D: values of G at --g-sweep-tokens")
    parser.add_argument("--g-sweep-tokens", type=int, default=1000)
    parser.add_argument("--template", default="terse", help="prompt template (mg3d.prompts)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--runs", type=int, default=5, help="timed steps per path")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per path (the first counts FLOPs)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 only when nothing else runs)"
    )
    parser.add_argument(
        "--no-lean",
        dest="lean",
        action="store_false",
        help="skip the paths with the lean decoder + fused AdamW (2D: one more path; 3D: a third path)",
    )
    parser.add_argument(
        "--real-batch", type=int, default=2, help="real: prompts per rollout (2D images, G = --generations)"
    )
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="skip the two bf16 2D paths (mg3d bf16-mixed, TRL with its defaults)",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="profile one more step where a target is judged; print it if missed (auto)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    if args.image_size % 28:
        parser.error("--image-size must be a multiple of 28")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|does not have many workers).*")
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; quieten them afterwards

    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parts = {p.strip() for p in args.parts.split(",")}
    started = time.time()
    load_start = os.getloadavg()
    peaks = Peaks()

    stats_2d, tables_2d = run_2d(args) if "2d" in parts else (None, {})
    peaks.measure()
    configs: list[Config3D] = []
    if "3d" in parts:
        wanted = [(n, args.generations) for n in _ints(args.tokens)]
        wanted += [
            (args.g_sweep_tokens, g) for g in _ints(args.g_sweep) if (args.g_sweep_tokens, g) not in wanted
        ]
        judged = min((n for n, _ in wanted if n >= TARGET_3D_TOKENS), default=None)
        for n, g in wanted:
            profile = args.profile != "never" and n == judged and g == args.generations
            configs.append(run_3d(args, n, g, profile))
            c = configs[-1]
            print(
                f"[3d] N={n} G={g}: shared {c.shared.median:.3f} s, repeated {c.repeated.median:.3f} s, "
                f"speed-up {c.speedup:.2f}×",
                file=sys.stderr,
                flush=True,
            )
            peaks.measure()

    real = run_real(args) if "real" in parts else None
    lines = header(args, peaks, started, load_start)
    if stats_2d:
        lines += [*report_2d(stats_2d, tables_2d, peaks, args), ""]
    if configs:
        lines += [*report_3d(configs, peaks, args.profile), ""]
    if real:
        lines += [*report_real(real, args), ""]
    if args.plot:
        plot(args.plot, stats_2d, configs, args.generations, args.g_sweep_tokens)
        lines += [
            f"![one GRPO step]({os.path.relpath(args.plot, args.out.parent) if args.out else args.plot})",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


def mg3d_params() -> Iterator[torch.nn.Parameter]:
    from mg3d.model import build_tiny_policy

    return build_tiny_policy(seed=0).model.parameters()


if __name__ == "__main__":
    main()
