"""Training-time held-out evaluation and ``scripts/evaluate.py`` score the same completions the same way.

Both go through :func:`mg3d.grounding.predict` and the ``mg3d`` protocol (box read by
:func:`mg3d.prompts.read_answer`, clipped to the image, Acc with IoU ≥ τ). A scripted
:class:`~mg3d.generation.RolloutBackend` writes chosen completions — the answer, a box that leaves the
image, half a box (its IoU is used as a tied threshold), a miss and garbage — so the cases where two conventions used to disagree
(clipping, ``>`` vs ``≥``) are all present.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_grounder import PIPELINES, POLICY, PROMPT, make_grounder, write_phantoms

from mg3d.boxes import pair_iou
from mg3d.data.transforms import build_pipeline, record_to_item
from mg3d.evaluation import GroundingEvaluator, accuracy
from mg3d.generation import Rollout, RolloutConfig
from mg3d.grpo.config import EvalConfig
from mg3d.grpo.module import GRPOModule

REPO = Path(__file__).resolve().parents[1]


class ScriptedBackend:
    """A RolloutBackend that 'generates' fixed texts for prompts in order (e.g. replayed from a log)."""

    def __init__(self, policy: Any, texts: list[str]) -> None:
        self.policy, self.texts, self.calls = policy, texts, 0

    def generate(self, prompt_inputs: Mapping[str, Any], config: RolloutConfig) -> Rollout:
        b = prompt_inputs["input_ids"].shape[0]
        texts = self.texts[:b]
        self.calls += 1
        tok = self.policy.tokenizer
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [self.policy.eos_token_id] for t in texts]
        width = max(len(i) for i in ids)
        completion = torch.full((b, width), self.policy.pad_token_id)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, row in enumerate(ids):
            completion[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return Rollout(
            prompt_ids=prompt_inputs["input_ids"], prompt_mask=prompt_inputs["attention_mask"],
            completion_ids=completion, completion_mask=mask, texts=list(texts),
            is_truncated=torch.zeros(b, dtype=torch.bool), prompt_index=torch.arange(b), num_generations=1,
        )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    records = write_phantoms(tmp_path_factory.mktemp("phantoms"))[:5]
    assert len(records) == 5
    module = GRPOModule(policy=POLICY, prompt=PROMPT, evaluation=EvalConfig(max_new_tokens=24))
    samples = [build_pipeline(PIPELINES[f"{r.ndim}d"], r.ndim)(record_to_item(r)) for r in records]
    batch = module.prompter.build(samples)
    texts = []
    for i, visual in enumerate(batch.visuals):
        gt_text = batch.voxel_to_text[i].to_text(batch.gt_boxes[i][:1])[0]
        shape = np.asarray(visual.text_shape, dtype=float)
        d = visual.ndim
        if i == 0:  # the answer itself
            box = gt_text
        elif i == 1:  # a box that leaves the image on every high edge
            box = np.concatenate([gt_text[:d], shape + 5])
        elif i == 2:  # half the box along x (about IoU 0.5 after the text grid's rounding)
            box = gt_text.copy()
            box[d] = (gt_text[0] + gt_text[d]) / 2
        elif i == 3:  # a far corner
            box = np.asarray([0] * d + [1] * d, dtype=float)
        if i < 4:
            codes = list(module.policy.codec.encode(box, visual.text_shape))
            if i == 1:  # the codec clamps what it writes; a model need not: past the grid's far edges
                codes[d:] = [int(s) + 5 for s in shape]
            texts.append("<answer>[" + ", ".join(str(v) for v in codes) + "]</answer>")
        else:
            texts.append("no box in this completion")
    return module, records, samples, texts


def test_training_evaluation_equals_evaluate_script(setup, tmp_path) -> None:
    module, records, samples, texts = setup
    module._backend = ScriptedBackend(module.policy, texts)
    _, got_texts, train_ious = module.predict_samples(samples)
    assert got_texts == texts

    grounder = make_grounder(module.policy)
    grounder.backend = ScriptedBackend(module.policy, texts)
    preds = list(grounder.predict_records(records, batch_size=len(records), progress=False))
    evaluator = GroundingEvaluator("mg3d", n_bootstrap=0)
    rows = evaluator.update(preds)
    eval_ious = np.asarray([r.iou for r in rows])
    np.testing.assert_array_equal(train_ious, eval_ious)

    # the cases are what they claim: the answer (best the text grid allows), clipped, half, miss, no box
    assert eval_ious[0] > max(eval_ious[2], eval_ious[3]) and eval_ious[3] < 0.1 and eval_ious[4] == 0.0
    clipped = preds[1]
    assert np.all(np.asarray(clipped.box_voxel[records[1].ndim :]) <= np.asarray(records[1].spatial_shape))
    batch = module.prompter.build(samples[1:2])
    raw = module.prompter.read(texts[1:2], batch, [0])[0].box_source  # before clipping: leaves the image
    assert np.any(raw[records[1].ndim :] > np.asarray(records[1].spatial_shape))
    assert pair_iou(raw[None], batch.gt_boxes[0][:1])[0] < eval_ious[1]  # unclipped scores lower
    metrics = evaluator.compute()
    assert metrics["mIoU"] == pytest.approx(float(train_ious.mean()))
    assert metrics["acc@0.5"] == pytest.approx(accuracy(train_ious, 0.5))
    # a tie at the threshold counts on both sides (IoU ≥ τ): τ = the half box's own IoU
    tie = float(eval_ious[2])
    tied = GroundingEvaluator("mg3d", thresholds=(tie,), n_bootstrap=0)
    tied.update(preds)
    assert tied.compute()[f"acc@{tie:g}"] == accuracy(train_ious, tie) == np.mean(train_ious >= tie)
    assert accuracy(train_ious, tie) > np.mean(train_ious > tie)

    # and the file route of scripts/evaluate.py --predictions gives the same numbers
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in preds), encoding="utf-8")
    out = tmp_path / "eval"
    assert script.main(["--predictions", str(path), "--out", str(out), "--bootstrap", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert report["metrics"]["mIoU"] == pytest.approx(float(train_ious.mean()))
    assert report["metrics"]["acc@0.5"] == pytest.approx(accuracy(train_ious, 0.5))
