"""From pipeline samples to model inputs, and from completions back to boxes: the prompter and one predict path.

The seam between the data side (a sample: visual tensor + its ``voxel_to_grid`` frame + ground truth) and the
model side (chat-templated prompt, vision tokens, a box codec). GRPO, the supervised warm start, held-out
evaluation, ``Grounder`` and the bundle's inference all go through :class:`GroundingPrompter` and
:func:`predict`, so a box is encoded and decoded the same way everywhere: voxel frame → ``voxel_to_text`` →
codec integers in the prompt/answer, and back with :func:`mg3d.prompts.read_answer`.

Three frames, three names (all :class:`~mg3d.frames.CoordinateFrame`, each from a source grid to a
destination grid):

* ``voxel_to_grid`` — a pipeline sample's ``sample["frame"]``: stored voxel grid → the pipeline tensor's grid;
* ``grid_to_text`` — tokenization's own steps: pipeline grid → the text grid the model reads and writes;
* ``voxel_to_text`` — the two composed: stored voxel grid → text grid (what predictions are mapped back with).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mg3d.boxes import coarsen_box, validate_boxes
from mg3d.errors import BoxError, ConfigError, DataError
from mg3d.frames import CoordinateFrame
from mg3d.generation import HFRolloutBackend, RolloutBackend, RolloutConfig
from mg3d.model import Policy
from mg3d.prompts import (
    Answer,
    build_messages,
    check_warm_start_options,
    format_completion,
    get_template,
    read_answer,
    render_prompt,
)
from mg3d.tokenization import TokenizedVisual, VisionSpec, VisualTokenizer, build_model_inputs

__all__ = [
    "TRAIL_SUBJECT",
    "GroundingPrompter",
    "Predicted",
    "PromptBatch",
    "PromptConfig",
    "grid_to_text",
    "predict",
]

_LOG = logging.getLogger(__name__)

#: The words before the coarse box of a warm-start reasoning trail (``<think>the lesion [x1, …]</think>``).
TRAIL_SUBJECT = "the lesion"
_TERSE = get_template("terse")


def _whole_number(value: object) -> object:
    """``8.0`` or ``"8"`` (YAML, command line) as the int 8; anything else unchanged, for the check to refuse."""
    if isinstance(value, bool | int):
        return value
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value
    return int(number) if math.isfinite(number) and number.is_integer() else value


@dataclass
class PromptConfig:
    """How a sample is asked: template, how volumes are shown, the token budget, laterality hint, parsing.

    Args:
        instruction: the user turn. ``template`` is the template's own instruction; ``terse`` asks
            "Find {phrase}." (the ``terse`` template's wording) while keeping the template's answer format and
            ``<think>`` tags — for tiny byte-level models, where the ``chain_of_box`` instruction is ~700
            tokens and makes every step about 10× slower.
        warm_start_reasoning: what the supervised warm start writes inside ``<think>`` for think templates:
            ``empty`` (``<think></think>``), or ``coarse_box`` — a box trail ``the lesion [coarse box]``, the
            answer box widened outward to ``trail_grid``, so a Chain-of-Box model learns to write a box the
            ``chain_of_box`` reward can score.
        trail_grid: coarse cell size per text-grid axis (x, y[, z]) of that trail box; 2 or 3 positive
            integers (2D samples use the first two).
        max_vision_tokens: vision tokens per image or volume. ``None`` (default): images are sized within the
            checkpoint folder's ``min_pixels``/``max_pixels`` (as its own processor and the TRL path size them;
            1024 tokens for the tiny model) and volumes get 1024; a number overrides the folder (logged).
    """

    template: Literal["terse", "plain", "r1", "chain_of_box"] = "r1"
    volume_strategy: Literal["video", "slices", "montage"] = "video"
    max_vision_tokens: int | None = None
    laterality: bool = False
    parse_mode: Literal["lenient", "strict"] = "lenient"
    system_prompt: str | None = None
    instruction: Literal["template", "terse"] = "template"
    warm_start_reasoning: Literal["empty", "coarse_box"] = "empty"
    # A tuple default, not a default factory: a config pickled into a checkpoint before this field existed
    # then reads the class attribute (mg3d's safe checkpoint loader refuses classes with a __setstate__).
    trail_grid: tuple[int, ...] = (8, 8, 4)

    def __post_init__(self) -> None:
        grid = self.trail_grid
        if isinstance(grid, str):  # "8,8,4" from a command line
            grid = [v.strip() for v in grid.split(",")]
        if isinstance(grid, list | tuple):  # anything else is refused by check_warm_start_options
            grid = [_whole_number(v) for v in grid]
        checked = check_warm_start_options(
            self.instruction, self.warm_start_reasoning, grid, prefix="prompt."
        )
        self.trail_grid = checked
        if self.parse_mode not in ("lenient", "strict"):
            raise ConfigError(f"prompt.parse_mode must be 'lenient' or 'strict', got {self.parse_mode!r}")


@dataclass
class PromptBatch:
    """A batch of grounding prompts ready for the model, with what is needed to score its answers.

    ``voxel_to_text[i]`` maps sample ``i``'s stored voxel frame to the text grid the model sees (the pipeline's
    steps followed by tokenization's); ``grid_to_text[i]`` only tokenization's steps, from the pipeline tensor's
    grid. ``gt_boxes[i]`` are in the stored voxel frame.
    """

    inputs: dict[str, torch.Tensor]
    prompts: list[str]
    visuals: list[TokenizedVisual]
    voxel_to_text: list[CoordinateFrame]
    ndims: list[int]
    gt_boxes: list[np.ndarray]
    ids: list[str]
    texts: list[str]
    answers: list[str]
    samples: list[Mapping[str, Any]] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def grid_to_text(self) -> list[CoordinateFrame]:
        """Tokenization's part of each frame: pipeline grid → text grid (what rewards on the tensor score)."""
        if len(self.samples) != len(self):
            raise ConfigError("grid_to_text needs the batch's pipeline samples (built without them)")
        return [grid_to_text(s["frame"], f) for s, f in zip(self.samples, self.voxel_to_text)]


def grid_to_text(voxel_to_grid: CoordinateFrame, voxel_to_text: CoordinateFrame) -> CoordinateFrame:
    """The steps of ``voxel_to_text`` after those of ``voxel_to_grid``: pipeline grid → text grid."""
    head = len(voxel_to_grid.steps)
    if len(voxel_to_text.steps) < head or any(
        a is not b for a, b in zip(voxel_to_text.steps, voxel_to_grid.steps)
    ):
        raise ConfigError("the text frame does not start with the sample's pipeline frame")
    return CoordinateFrame(voxel_to_grid.shape, voxel_to_text.steps[head:])


class GroundingPrompter:
    """Builds prompts for samples and reads completions back, for one policy and one :class:`PromptConfig`.

    ``GroundingPrompter(policy, config)``, or keyword settings that replace fields of ``config`` (or of the
    default ``PromptConfig()``): ``GroundingPrompter(policy, template="terse")``.
    """

    def __init__(self, policy: Policy, config: PromptConfig | None = None, **settings: Any) -> None:
        base = config if config is not None else PromptConfig()
        if settings:
            try:
                base = dataclasses.replace(base, **settings)
            except TypeError as err:
                known = sorted(f.name for f in dataclasses.fields(PromptConfig))
                raise ConfigError(f"GroundingPrompter: {err}; PromptConfig fields are {known}") from None
        self.config = base
        self.policy = policy
        self.template = get_template(base.template)
        self.spec = VisionSpec.from_policy(policy)
        self.visual_tokenizer = VisualTokenizer(
            self.spec, volume_strategy=base.volume_strategy, max_vision_tokens=base.max_vision_tokens
        )
        if base.max_vision_tokens is not None and self.spec.max_pixels is not None:
            folder_tokens = self.spec.image_budget(None)
            if folder_tokens != base.max_vision_tokens:
                _LOG.warning(
                    "prompt.max_vision_tokens=%d overrides the checkpoint folder's image limit "
                    "(max_pixels=%d, %d vision tokens)",
                    base.max_vision_tokens,
                    self.spec.max_pixels,
                    folder_tokens,
                )
        self.codec = policy.codec

    @classmethod
    def from_config(cls, policy: Policy, config: PromptConfig) -> GroundingPrompter:
        """The prompter a :class:`PromptConfig` describes (same as ``GroundingPrompter(policy, config)``)."""
        return cls(policy, config)

    @property
    def parse_mode(self) -> Literal["lenient", "strict"]:
        return self.config.parse_mode

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
        if self.config.laterality:
            laterality = "cxr" if ndim == 2 else "ct"
            z_direction = sample.get("z_direction", "superior") if ndim == 3 else None
        return build_messages(
            str(sample["text"]),
            ndim,
            template=_TERSE if self.config.instruction == "terse" else self.template,
            codec=self.codec,
            laterality=laterality,
            z_direction=z_direction,
            system_prompt=self.config.system_prompt,
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
        if self.template.think and self.config.warm_start_reasoning == "coarse_box":
            if len(self.config.trail_grid) < visual.ndim:
                raise ConfigError(
                    f"trail_grid {list(self.config.trail_grid)} has {len(self.config.trail_grid)} sizes; a {visual.ndim}D sample "
                    f"needs {visual.ndim} (x, y[, z])"
                )
            written = self.codec.decode(values, shape)
            coarse = coarsen_box(written, shape, self.config.trail_grid[: visual.ndim])
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
        return self._batch(prompts, visuals, gts, answers, samples)

    def subset(self, batch: PromptBatch, indices: Sequence[int]) -> PromptBatch:
        """The prompts ``indices`` of a batch as a batch of their own (visuals are reused, not recomputed)."""
        idx = list(indices)
        return self._batch(
            [batch.prompts[i] for i in idx],
            [batch.visuals[i] for i in idx],
            [batch.gt_boxes[i] for i in idx],
            [batch.answers[i] for i in idx],
            [batch.samples[i] for i in idx] if batch.samples else [],
            ids=[batch.ids[i] for i in idx],
            texts=[batch.texts[i] for i in idx],
        )

    def _batch(
        self,
        prompts: list[str],
        visuals: list[TokenizedVisual],
        gts: list[np.ndarray],
        answers: list[str],
        samples: Sequence[Mapping[str, Any]],
        *,
        ids: list[str] | None = None,
        texts: list[str] | None = None,
    ) -> PromptBatch:
        inputs = build_model_inputs(prompts, visuals, self.policy.tokenizer, self.spec)
        return PromptBatch(
            inputs=dict(inputs),
            prompts=prompts,
            visuals=visuals,
            voxel_to_text=[v.frame for v in visuals],
            ndims=[v.ndim for v in visuals],
            gt_boxes=gts,
            ids=ids if ids is not None else [str(s.get("id", "")) for s in samples],
            texts=texts if texts is not None else [str(s["text"]) for s in samples],
            answers=answers,
            samples=list(samples),
        )

    # -- answers ----------------------------------------------------------------------------------------

    def read(
        self, completions: Sequence[str], batch: PromptBatch, prompt_index: Sequence[int]
    ) -> list[Answer]:
        """Each completion's box on the text grid and in the stored voxel frame (never raises)."""
        return [
            read_answer(
                text,
                batch.visuals[p].ndim,
                frame=batch.voxel_to_text[p],
                codec=self.codec,
                mode=self.config.parse_mode,
            )
            for text, p in zip(completions, prompt_index)
        ]


@dataclass
class Predicted:
    """One completion per sample: the prompt batch, the completion texts and their answers (voxel frame)."""

    batch: PromptBatch
    texts: list[str]
    answers: list[Answer]
    #: which completions reached ``max_new_tokens`` without finishing (no EOS, no stop string)
    truncated: list[bool] = field(default_factory=list)


@torch.no_grad()
def predict(
    prompter: GroundingPrompter,
    samples: Sequence[Mapping[str, Any]],
    config: RolloutConfig,
    backend: RolloutBackend | None = None,
) -> Predicted:
    """Prompt, generate one completion per sample (``config.num_generations`` must be 1) and read the answers.

    The one predict path of mg3d: held-out evaluation during ``fit`` (with the module's seeded backend) and
    ``Grounder`` (unseeded transformers generation) both call it, so they predict the same box for a sample.
    """
    if config.num_generations != 1:
        raise ConfigError(
            f"predict writes one completion per sample; got num_generations={config.num_generations}"
        )
    batch = prompter.build(samples)
    rollout = (backend or HFRolloutBackend(prompter.policy)).generate(batch.inputs, config)
    index = rollout.prompt_index.tolist()
    if index != list(range(len(batch))):
        raise ConfigError(
            f"backend returned completions for prompts {index}, expected one per prompt in order"
        )
    answers = prompter.read(rollout.texts, batch, index)
    return Predicted(batch, list(rollout.texts), answers, [bool(t) for t in rollout.is_truncated.tolist()])
