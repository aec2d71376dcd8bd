"""Grounding metrics under named evaluation protocols, an accumulator for Lightning hooks, and result files.

Three protocols (``docs/evaluation.md`` puts them side by side):

* ``mg3d`` (default) — the lenient parser (a box counts when it comes from a complete ``<answer>``, as in
  training); the box is decoded with the model's codec, mapped from the text frame back to the stored image's
  voxel frame through the record's :class:`~mg3d.frames.CoordinateFrame`, clipped to the image, and scored with
  the standard (MONAI-convention, half-open) IoU against the best of the ground-truth boxes. Acc@τ uses
  ``IoU ≥ τ`` by default (MedRPG's rule); ``comparison=">"`` switches.
* ``medground-r1`` — the MedGround-R1 / VLM-R1 evaluation, exactly: the strict parser (first ``<answer>``,
  integers inside ``{…}``), ``[0, 0, 0, 0]`` when that fails, no rescaling (the model's numbers are compared
  with the ground truth as stored), their IoU formula (:func:`medground_r1_iou`) and ``IoU > 0.5``.
* ``m3d`` — M3D-LaMed's REC numbers: both boxes normalised as M3D does (index / axis length, *inclusive* max,
  3 decimals) and compared with M3D's "IoU", whose denominator is the volume of the enclosing box, not the
  union (:func:`m3d_enclosing_iou`). **Not a standard IoU** — only for comparing with numbers reported that way.

In every protocol a completion without a usable box scores IoU 0 and stays in the denominator.

Lightning use (one evaluator per stage; ``sync`` gathers the rows of every rank before ``compute``)::

    def on_validation_epoch_start(self):
        self.evaluator.reset()

    def validation_step(self, batch, batch_idx):
        self.evaluator.update(self.grounder.predict_records(batch["records"], progress=False))

    def on_validation_epoch_end(self):
        self.evaluator.sync()
        self.log_dict({f"val/{k}": v for k, v in self.evaluator.compute().items()}, rank_zero_only=True)
"""

from mg3d.evaluation.evaluator import GroundingEvaluator, rescore
from mg3d.evaluation.files import read_predictions, write_metrics_json, write_metrics_md, write_predictions
from mg3d.evaluation.metrics import accuracy, aggregate, bootstrap_ci
from mg3d.evaluation.protocols import (
    DEFAULT_THRESHOLDS,
    PROTOCOLS,
    ProtocolSpec,
    get_protocol,
    m3d_enclosing_iou,
    m3d_normalize,
    medground_r1_iou,
)
from mg3d.evaluation.scoring import (
    EvalItem,
    ScoredPrediction,
    box_in_image,
    item_from_prediction,
    score_item,
    score_predicted,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PROTOCOLS",
    "EvalItem",
    "GroundingEvaluator",
    "ProtocolSpec",
    "ScoredPrediction",
    "accuracy",
    "aggregate",
    "bootstrap_ci",
    "box_in_image",
    "get_protocol",
    "item_from_prediction",
    "m3d_enclosing_iou",
    "m3d_normalize",
    "medground_r1_iou",
    "read_predictions",
    "rescore",
    "score_item",
    "score_predicted",
    "write_metrics_json",
    "write_metrics_md",
    "write_predictions",
]
