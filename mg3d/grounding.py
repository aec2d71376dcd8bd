"""From pipeline samples to model inputs, and from completions back to voxel-frame boxes.

This is the seam between the data side (a sample: visual tensor + ``CoordinateFrame`` + ground truth) and the
model side (chat-templated prompt, vision tokens, a box codec). GRPO, the supervised warm start, evaluation and
the bundle's inference all go through :class:`GroundingPrompter`, so a box is encoded and decoded the same way
everywhere: voxel frame → ``frame.to_text`` → codec integers in the prompt/answer, and back with the parser →
codec → ``frame.to_voxel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mg3d.boxes import CoordinateFrame, coarsen_box, iou_matrix, validate_boxes
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.model import Policy
from mg3d.prompts import (
    ParsedCompletion,
    build_messages,
    check_warm_start_options,
    format_completion,
    get_template,
    parse_completion,
    render_prompt,
)
from mg3d.tokenization import TokenizedVisual, VisionSpec, VisualTokenizer, build_model_inputs

if TYPE_CHECKING:  # mg3d.grpo.config imports the policy code; only the annotation is needed here
    from mg3d.grpo.config import PromptConfig

__all__ = ["TRAIL_SUBJECT", "Decoded", "GroundingPrompter", "PromptBatch", "best_iou"]

#: The words before the coarse box of a warm-start reasoning trail (``<think>the lesion [x1, …]</think>``).
TRAIL_SUBJECT = "the lesion"
_TERSE = get_template("terse")


@dataclass
class PromptBatch:
    """A batch of grounding prompts ready for the model, with what is needed to score its answers.

    ``frames[i]`` maps sample ``i``'s *original* voxel frame to the text grid the model sees (the pipeline's
    steps followed by tokenization's). ``gt_boxes[i]`` are in that original voxel frame.
    """

    inputs: dict[str, torch.Tensor]
    prompts: list[str]
    visuals: list[TokenizedVisual]
    frames: list[CoordinateFrame]
    ndims: list[int]
    gt_boxes: list[np.ndarray]
    ids: list[str]
    texts: list[str]
    answers: list[str]
    samples: list[Mapping[str, Any]] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Decoded:
    """One completion read back: the parse, the box in the text grid and in the original voxel frame."""

    parsed: ParsedCompletion
    box_text: np.ndarray | None
    box_voxel: np.ndarray | None

    @property
    def ok(self) -> bool:
        return self.box_voxel is not None


def best_iou(box_voxel: np.ndarray | None, gt_boxes: np.ndarray) -> float:
    """IoU against the best-matching ground-truth box (a phrase may have several); 0 for no box."""
    if box_voxel is None or len(gt_boxes) == 0:
        return 0.0
    return float(iou_matrix(box_voxel[None, :], gt_boxes).max())


class GroundingPrompter:
    """Builds prompts for samples and decodes completions, for one policy and one prompt set-up.

    Args:
        policy: the model, its tokenizer, image processor and codec.
        template: prompt template name (``terse``, ``plain``, ``r1``, ``chain_of_box``).
        volume_strategy: how volumes are shown (``video``, ``slices``, ``montage``).
        max_vision_tokens: token budget per visual.
        laterality: add the display-convention hint for ``"cxr"``/``"ct"`` phrases, or ``None``.
        parse_mode: ``lenient`` (rewards, mg3d evaluation) or ``strict`` (MedGround-R1 rules).
        system_prompt: optional system turn.
        instruction: ``template`` (the template's own user turn) or ``terse`` ("Find {phrase}."; the template's
            answer format and ``<think>`` tags are kept).
        warm_start_reasoning: the supervised target's ``<think>`` for think templates: ``empty``, or
            ``coarse_box`` — ``{TRAIL_SUBJECT} [coarse box]``, the answer box widened outward to ``trail_grid``
            (see :meth:`answer_for`).
        trail_grid: coarse cell size per text-grid axis, (x, y[, z]); 2D samples use the first two.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        template: str = "r1",
        volume_strategy: Literal["video", "slices", "montage"] = "video",
        max_vision_tokens: int = 1024,
        laterality: bool = False,
        parse_mode: Literal["lenient", "strict"] = "lenient",
        system_prompt: str | None = None,
        instruction: Literal["template", "terse"] = "template",
        warm_start_reasoning: Literal["empty", "coarse_box"] = "empty",
        trail_grid: Sequence[int] = (8, 8, 4),
    ) -> None:
        self.policy = policy
        self.template = get_template(template)
        grid = check_warm_start_options(instruction, warm_start_reasoning, trail_grid)
        self.instruction = instruction
        self.warm_start_reasoning = warm_start_reasoning
        self.trail_grid = grid
        self.spec = VisionSpec.from_policy(policy)
        self.visual_tokenizer = VisualTokenizer(
            self.spec, volume_strategy=volume_strategy, max_vision_tokens=max_vision_tokens
        )
        self.laterality = laterality
        if parse_mode not in ("lenient", "strict"):
            raise ConfigError(f"parse_mode must be 'lenient' or 'strict', got {parse_mode!r}")
        self.parse_mode = parse_mode
        self.system_prompt = system_prompt
        self.codec = policy.codec

    @classmethod
    def from_config(cls, policy: Policy, config: PromptConfig) -> GroundingPrompter:
        """The prompter a :class:`~mg3d.grpo.config.PromptConfig` describes (training, inference and benches
        build it the same way)."""
        return cls(
            policy,
            template=config.template,
            volume_strategy=config.volume_strategy,
            max_vision_tokens=config.max_vision_tokens,
            laterality=config.laterality,
            parse_mode=config.parse_mode,
            system_prompt=config.system_prompt,
            instruction=config.instruction,
            warm_start_reasoning=config.warm_start_reasoning,
            trail_grid=tuple(config.trail_grid),
        )

    # -- prompts ----------------------------------------------------------------------------------------

    def tokenize_sample(self, sample: Mapping[str, Any], *, region_hint: bool = False) -> TokenizedVisual:
        """The sample's visual as model inputs, with its frame extended to the text grid.

        ``region_hint`` lets the ``slices``/``montage`` strategies centre their slices on the ground truth —
        a training crop. Never at evaluation or inference: it would leak the answer into the input.
        """
        region = None
        if region_hint and self.visual_tokenizer.volume_strategy != "video" and len(sample.get("boxes", [])):
            region = np.asarray(sample["boxes"], dtype=float)[0]  # voxel frame; the tokenizer maps it
        return self.visual_tokenizer(
            sample["image"], sample["frame"], spacing=sample.get("spacing"), region=region
        )

    def _messages(self, sample: Mapping[str, Any], visual: TokenizedVisual) -> list[dict[str, Any]]:
        ndim = visual.ndim
        laterality = None
        z_direction = None
        if self.laterality:
            laterality = "cxr" if ndim == 2 else "ct"
            z_direction = sample.get("z_direction", "superior") if ndim == 3 else None
        return build_messages(
            str(sample["text"]),
            ndim,
            template=_TERSE if self.instruction == "terse" else self.template,
            codec=self.codec,
            laterality=laterality,
            z_direction=z_direction,
            system_prompt=self.system_prompt,
            record_id=str(sample.get("id", "")),
            **visual.prompt_kwargs(),
        )

    def answer_for(self, gt_voxel: np.ndarray, visual: TokenizedVisual) -> str:
        """The target completion for supervised training: the first ground-truth box in the text frame.

        With ``warm_start_reasoning="coarse_box"`` a think template's ``<think>`` holds a coarse-to-fine trail,
        ``the lesion [coarse box]``: the box the answer *writes* (codec integers decoded back to the text grid)
        widened outward to ``trail_grid`` and encoded with the same codec. Encoding is monotonic, so the coarse
        box the parser reads contains the answer box exactly and lies inside the grid — the Chain-of-Box reward
        scores such a target 1 (well-formed and consistent).
        """
        text_box = visual.frame.to_text(gt_voxel[:1])[0]
        shape = visual.text_shape
        values = self.codec.encode(text_box, shape)
        reasoning = ""
        if self.template.think and self.warm_start_reasoning == "coarse_box":
            if len(self.trail_grid) < visual.ndim:
                raise ConfigError(
                    f"trail_grid {list(self.trail_grid)} has {len(self.trail_grid)} sizes; a {visual.ndim}D sample "
                    f"needs {visual.ndim} (x, y[, z])"
                )
            written = self.codec.decode(values, shape)
            coarse = coarsen_box(written, shape, self.trail_grid[: visual.ndim])
            trail = self.codec.encode(coarse, shape)
            reasoning = f"{TRAIL_SUBJECT} [{', '.join(str(v) for v in trail)}]"
        return format_completion(values, visual.ndim, template=self.template, reasoning=reasoning)

    def build(self, samples: Sequence[Mapping[str, Any]], *, region_hint: bool = False) -> PromptBatch:
        """Tokenize the visuals, render the chat prompts and assemble one left-padded model batch."""
        if not samples:
            raise DataError("cannot build prompts for an empty batch")
        visuals, prompts, gts, answers = [], [], [], []
        for sample in samples:
            sid = sample.get("id", "?")
            try:
                visual = self.tokenize_sample(sample, region_hint=region_hint)
                gt = validate_boxes(sample["boxes"], visual.ndim, what=f"record {sid} boxes")
            except (BoxError, ConfigError) as err:
                raise DataError(f"record {sid}: {err}") from err
            visuals.append(visual)
            prompts.append(render_prompt(self.policy.tokenizer, self._messages(sample, visual)))
            gts.append(gt)
            answers.append(self.answer_for(gt, visual) if len(gt) else "")
        inputs = build_model_inputs(prompts, visuals, self.policy.tokenizer, self.spec)
        return PromptBatch(
            inputs=dict(inputs),
            prompts=prompts,
            visuals=visuals,
            frames=[v.frame for v in visuals],
            ndims=[v.ndim for v in visuals],
            gt_boxes=gts,
            ids=[str(s.get("id", "")) for s in samples],
            texts=[str(s["text"]) for s in samples],
            answers=answers,
            samples=list(samples),
        )

    def subset(self, batch: PromptBatch, indices: Sequence[int]) -> PromptBatch:
        """The prompts ``indices`` of a batch as a batch of their own (visuals are reused, not recomputed)."""
        idx = list(indices)
        prompts = [batch.prompts[i] for i in idx]
        visuals = [batch.visuals[i] for i in idx]
        inputs = build_model_inputs(prompts, visuals, self.policy.tokenizer, self.spec)
        return PromptBatch(
            inputs=dict(inputs),
            prompts=prompts,
            visuals=visuals,
            frames=[batch.frames[i] for i in idx],
            ndims=[batch.ndims[i] for i in idx],
            gt_boxes=[batch.gt_boxes[i] for i in idx],
            ids=[batch.ids[i] for i in idx],
            texts=[batch.texts[i] for i in idx],
            answers=[batch.answers[i] for i in idx],
            samples=[batch.samples[i] for i in idx] if batch.samples else [],
        )

    # -- answers ----------------------------------------------------------------------------------------

    def decode(
        self, completions: Sequence[str], batch: PromptBatch, prompt_index: Sequence[int]
    ) -> list[Decoded]:
        """Parse each completion (never raises) and map its box to the text grid and the voxel frame."""
        out: list[Decoded] = []
        for text, p in zip(completions, prompt_index):
            visual = batch.visuals[p]
            parsed = parse_completion(
                text, visual.ndim, mode=self.parse_mode, codec=self.codec, grid_shape=visual.text_shape
            )
            if parsed.box is None or not parsed.ok:
                out.append(Decoded(parsed, None, None))
                continue
            box_text = np.asarray(parsed.box, dtype=np.float64)
            try:
                box_voxel = visual.frame.to_voxel(box_text)[0]
            except BoxError:
                out.append(Decoded(parsed, box_text, None))
                continue
            out.append(Decoded(parsed, box_text, box_voxel))
        return out

    def ious(self, decoded: Sequence[Decoded], batch: PromptBatch, prompt_index: Sequence[int]) -> np.ndarray:
        """Best-match IoU in the original voxel frame for each decoded completion."""
        return np.asarray([best_iou(d.box_voxel, batch.gt_boxes[p]) for d, p in zip(decoded, prompt_index)])
