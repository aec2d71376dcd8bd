"""Held-out evaluation of the policy inside ``fit`` and the validate / test / predict steps of ``GRPOModule``.

One predict path and one scoring convention (``docs/architecture.md``): ``mg3d.grounding.predict`` then
``mg3d.evaluation.score_predicted`` — the box clipped to the image, the best match over the ground truth, so the
numbers equal ``scripts/evaluate.py``'s. Before GRPO (after the warm start) and at the end of ``fit`` the policy is
scored greedy and sampled on the DataModule's held-out samples; the table is printed and written to
``<log_dir>/grpo_summary.{json,md}``.

A mixin rather than functions so that ``GRPOModule.predict_samples`` and the Lightning hooks keep their names
(tests, ``scripts/evaluate.py`` and the Grounder call them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mg3d.evaluation import ScoredPrediction, accuracy, score_predicted
from mg3d.evaluation.baselines import in_one_frame, prior_baselines
from mg3d.evaluation.controls import distinct_boxes, swap_images
from mg3d.generation import HFRolloutBackend, RolloutConfig
from mg3d.grounding import PromptBatch, predict
from mg3d.prompts import default_max_new_tokens

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from mg3d.grounding import GroundingPrompter
    from mg3d.grpo.config import EvalConfig
    from mg3d.model import Policy

log = logging.getLogger(__name__)

__all__ = ["HeldOutEvaluation", "as_samples", "format_summary"]


def as_samples(batch: Any) -> list[Mapping[str, Any]]:
    """The DataModule's dict of aligned lists as a list of per-sample dicts (a list passes through)."""
    if isinstance(batch, Mapping):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        return [{k: batch[k][i] for k in keys} for i in range(n)]
    return list(batch)


class HeldOutEvaluation:
    """Evaluation hooks of ``GRPOModule`` (mixed into the LightningModule; the attributes below are its own)."""

    if TYPE_CHECKING:
        policy: Policy
        prompter: GroundingPrompter
        eval_config: EvalConfig
        rollout_config: RolloutConfig
        eval_results: dict[str, dict[str, float]]
        model: torch.nn.Module
        trainer: pl.Trainer
        global_step: int
        loggers: list[Any]
        grpo_start_step: int

        def _rollout_backend(self) -> HFRolloutBackend: ...
        def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

    @torch.no_grad()
    def predict_samples(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        sampled: bool = False,
        max_new_tokens: int | None = None,
    ) -> tuple[PromptBatch, list[str], np.ndarray]:
        """Greedy (or one sampled) completion per sample; the batch, texts and IoUs as ``scripts/evaluate.py``
        scores them (``mg3d`` protocol: box clipped to the image, best match over the ground truth)."""
        config = self._eval_rollout_config(sampled=sampled, max_new_tokens=max_new_tokens)
        out = predict(self.prompter, samples, config, self._rollout_backend())
        rows = score_predicted(out, codec=self.policy.codec_name)
        return out.batch, out.texts, np.asarray([r.iou for r in rows], dtype=np.float64)

    def _eval_rollout_config(
        self, *, sampled: bool = False, max_new_tokens: int | None = None
    ) -> RolloutConfig:
        return RolloutConfig.one_per_prompt(
            max_new_tokens
            or self.eval_config.max_new_tokens
            or default_max_new_tokens(self.prompter.config.template),  # as Grounder on a plain folder
            sampled=sampled,
            temperature=self.eval_config.sampled_temperature,
            stop_strings=self.rollout_config.stop_strings,  # evaluated as trained
        )

    @torch.no_grad()
    def _eval_rows(self, samples: Sequence[Mapping[str, Any]], *, sampled: bool) -> list[ScoredPrediction]:
        """Scored greedy (or sampled) predictions for ``samples``, in batches of ``eval_config.batch_size``."""
        config = self._eval_rollout_config(sampled=sampled)
        rows: list[ScoredPrediction] = []
        bs = self.eval_config.batch_size
        for i in range(0, len(samples), bs):
            out = predict(self.prompter, samples[i : i + bs], config, self._rollout_backend())
            rows.extend(score_predicted(out, codec=self.policy.codec_name))
        return rows

    def _eval_samples(self) -> list[Mapping[str, Any]]:
        dm = getattr(self.trainer, "datamodule", None) if self.trainer is not None else None
        if dm is None or not hasattr(dm, "eval_samples"):
            return []
        return list(dm.eval_samples(self.eval_config.max_samples))

    def _evaluate(self, stage: str) -> None:
        """Held-out mIoU / Acc@0.5 (greedy, and sampled at T) of the current policy, logged and remembered."""
        if not self.eval_config.enabled or self.trainer is None:
            return
        samples = self._eval_samples()
        if not samples:
            return
        results: dict[str, float] = {}
        modes = [("greedy", False)] + ([("sampled", True)] if self.eval_config.sampled else [])
        was_training = self.model.training
        self.model.eval()
        try:
            for name, sampled in modes:
                rows = self._eval_rows(samples, sampled=sampled)
                arr = np.asarray([r.iou for r in rows], dtype=np.float64)
                results[f"{name}/mIoU"] = float(arr.mean())
                results[f"{name}/acc@0.5"] = float(accuracy(arr, 0.5))
                results[f"{name}/acc@0.3"] = float(accuracy(arr, 0.3))
                if not sampled:  # one box for every case is a prior, not grounding
                    results[f"{name}/distinct_boxes"] = float(distinct_boxes(rows))
            # image swap: each phrase with another case's image, scored against its own target — a policy that
            # looks at the image drops. Every generate call draws a sub-seed from the backend's generator, so its
            # state is restored: training samples after this exactly what it sampled without the control.
            swapped = swap_images(samples)
            if swapped is not None:
                generator = getattr(self._rollout_backend(), "generator", None)
                state = generator.get_state() if generator is not None else None
                arr = np.asarray([r.iou for r in self._eval_rows(swapped, sampled=False)], dtype=np.float64)
                if generator is not None:
                    generator.set_state(state)
                results["swap/mIoU"] = float(arr.mean())
                results["swap/acc@0.5"] = float(accuracy(arr, 0.5))
        finally:
            self.model.train(was_training)
        results["n"] = float(len(samples))
        results["step"] = float(self.global_step)
        self.eval_results[stage] = results
        # Straight to the loggers: this also runs in on_train_end, where self.log is not allowed.
        scalars = {f"eval_{stage}/{k}": v for k, v in results.items() if k not in ("n", "step")}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)
        log.info("evaluation %s: %s", stage, results)

    def on_train_end(self) -> None:
        """Evaluate the trained policy: after GRPO, or — in a supervised-only run (``max_steps`` equal to
        ``warm_start.steps``, e.g. pretraining a policy for a later GRPO run) — the warm-started policy."""
        if not self.eval_config.enabled:
            return
        if self.global_step > self.grpo_start_step:
            self._evaluate("after_grpo")
        elif self.grpo_start_step > 0 and self.global_step == self.grpo_start_step:
            self._evaluate("warm_start")
        else:
            return
        self._write_summary()

    def _prior_baselines(self) -> dict[str, float]:
        """Held-out mIoU of the best constant box and the best box per phrase, fitted on the training split: what
        a policy scores without looking at the image (``mg3d.evaluation.baselines``). Empty without a DataModule
        that names its sources."""
        dm = getattr(self.trainer, "datamodule", None) if self.trainer is not None else None
        samples = self._eval_samples()
        if dm is None or not samples or not getattr(dm, "sources", None):
            return {}
        from mg3d.data.datamodule import load_source_records

        records = [r for source in dm.sources for r in load_source_records(source, "train") if r.boxes]
        if not records or {len(r.spatial_shape) for r in records} != {len(samples[0]["frame"].source_shape)}:
            return {}
        shape = records[0].spatial_shape
        train = in_one_frame([r.boxes[0] for r in records], [r.spatial_shape for r in records], shape)
        held = in_one_frame(
            [s["boxes"][0] for s in samples], [s["frame"].source_shape for s in samples], shape
        )
        return prior_baselines((train, [r.text for r in records]), (held, [str(s["text"]) for s in samples]))

    def _write_summary(self) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        baselines = self._prior_baselines()
        table = format_summary(self.eval_results, baselines)
        print("\n" + table + "\n", flush=True)
        if self.trainer.log_dir:
            out = Path(self.trainer.log_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "grpo_summary.json").write_text(
                json.dumps({**self.eval_results, "baselines": baselines}, indent=2) + "\n", encoding="utf-8"
            )
            (out / "grpo_summary.md").write_text(table + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ validate / test / predict

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_samples(batch)
        _, _, ious = self.predict_samples(batch)
        self.log("val/mIoU", float(ious.mean()), batch_size=len(batch), sync_dist=True)
        self.log("val/acc@0.5", accuracy(ious, 0.5), batch_size=len(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        batch = as_samples(batch)
        _, _, ious = self.predict_samples(batch)
        self.log("test/mIoU", float(ious.mean()), batch_size=len(batch), sync_dist=True)
        self.log("test/acc@0.5", accuracy(ious, 0.5), batch_size=len(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        batch = as_samples(batch)
        out = predict(self.prompter, batch, self._eval_rollout_config(), self._rollout_backend())
        rows = score_predicted(out, codec=self.policy.codec_name)
        return [
            {
                "id": r.id,
                "text": out.batch.texts[i],
                "completion": out.texts[i],
                "box_voxel": None if r.box_voxel is None else list(r.box_voxel),
                "iou": r.iou,
            }
            for i, r in enumerate(rows)
        ]


#: the stage a GRPO phase is measured against: after an in-run warm start, or the policy as loaded ("start")
BEFORE_GRPO_STAGES = ("warm_start", "start")


def format_summary(
    results: Mapping[str, Mapping[str, float]], baselines: Mapping[str, float] | None = None
) -> str:
    """A short markdown table: held-out mIoU and Acc@0.5 at each evaluation stage, the image-swap control and
    the number of distinct boxes, then the prior-only baselines (``baselines``: the best constant box, the best
    box per phrase) a policy that looks must beat."""
    order = [s for s in ("start", "warm_start", "after_grpo") if s in results]
    lines = [
        "| stage | step | greedy mIoU | greedy Acc@0.5 | sampled mIoU | sampled Acc@0.5 | image-swap greedy mIoU "
        "| distinct boxes | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in order:
        r = results[stage]

        def f(key: str, r: Mapping[str, float] = r) -> str:
            return f"{r[key]:.3f}" if key in r else "–"

        distinct = str(int(r["greedy/distinct_boxes"])) if "greedy/distinct_boxes" in r else "–"
        lines.append(
            f"| {stage} | {int(r.get('step', 0))} | {f('greedy/mIoU')} | {f('greedy/acc@0.5')} | "
            f"{f('sampled/mIoU')} | {f('sampled/acc@0.5')} | {f('swap/mIoU')} | {distinct} | {int(r.get('n', 0))} |"
        )
    before = next((s for s in BEFORE_GRPO_STAGES if s in results), None)
    if before is not None and "after_grpo" in results:
        gain = results["after_grpo"]["greedy/mIoU"] - results[before]["greedy/mIoU"]
        what = "warm-started" if before == "warm_start" else "starting"
        lines.append("")
        lines.append(f"GRPO changed held-out greedy mIoU by {gain:+.3f} over the {what} policy.")
    names = {
        "constant_box/mIoU": "best constant box (ignores image and phrase)",
        "phrase_box/mIoU": "best box per phrase (ignores the image)",
    }
    if baselines:
        lines.append("")
        lines.append(
            "Prior-only baselines on the same held-out cases (fitted on the training split): "
            + "; ".join(f"{names.get(k, k)} {v:.3f}" for k, v in baselines.items())
            + ". Image swap: each phrase asked with another case's image, scored against its own target."
        )
    return "\n".join(lines)
