"""No patient identifiers leave the DICOM files they arrive in.

Radiographs in the MS-CXR layout (as MIMIC-CXR DICOMs) and a CT series carry PatientName, PatientID,
PatientBirthDate, InstitutionName, AccessionNumber and more. They go through ``prepare_data`` (one of them
truncated, to be skipped with a reason), a short training run (CSV logs, completion logs, a disk cache, a
checkpoint, mg3d's log messages), an evaluation with overlays, and a MONAI bundle export and its inference;
none of the identifier values may appear in anything written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
from PIL import Image
from test_reliability_data import write_dicom

from mg3d.boxes import mask_to_box
from mg3d.checkpointing import AtomicCheckpointIO
from mg3d.data import synthetic
from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.data.prepare import main as prepare_main
from mg3d.data.records import GroundingRecord, read_manifest, write_manifest
from mg3d.data.transforms import PipelineConfig

PHI = {
    "PatientName": "Quixotewhy^Zelda^Marguerite",
    "PatientID": "PID83620417",
    "PatientBirthDate": "19370521",
    "PatientSex": "F",
    "PatientAddress": "42 Wallabyquay Crescent",
    "OtherPatientIDs": "OPID5551234",
    "InstitutionName": "Saint Vibraniumfield Infirmary",
    "InstitutionAddress": "7 Larkspurcove Road",
    "AccessionNumber": "ACC77120934",
    "ReferringPhysicianName": "Drumhellerix^Octavia",
    "OperatorsName": "Pemberlyvane^Tobias",
    "StudyID": "STUDY90817",
}
# what must never appear in an output (one-letter PatientSex is not searchable)
NEEDLES = ["Quixotewhy", "Zelda^Marguerite", "PID83620417", "19370521", "Wallabyquay", "OPID5551234",
           "Vibraniumfield", "Larkspurcove", "ACC77120934", "Drumhellerix", "Pemberlyvane", "STUDY90817"]  # fmt: skip


def _cxr_dicoms(root: Path) -> tuple[Path, Path]:
    """MS-CXR phantoms whose JPEGs are replaced by DICOMs carrying identifiers (as MIMIC-CXR ships them)."""
    synthetic.make_cxr2d(root, 8, 1, layout="mscxr", max_findings=1)
    for jpg in sorted(root.rglob("*.jpg")):
        pixels = np.asarray(Image.open(jpg).convert("L"), dtype=np.uint16) * 16
        write_dicom(jpg.with_suffix(".dcm"), pixels, **PHI)
        jpg.unlink()
    broken = sorted(root.rglob("*.dcm"))[-1]
    broken.write_bytes(broken.read_bytes()[:-2000])  # truncated: skipped, with a reason that must not leak
    return root / synthetic.MSCXR_CSV_NAME, root


def _ct_series(folder: Path, vol: np.ndarray, spacing: tuple[float, float, float], series: int) -> None:
    """A CT series (one DICOM file per slice) with identifiers; SimpleITK reads it back as ``vol`` (i, j, k)."""
    from pydicom.uid import generate_uid

    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(vol.shape[2]):
        write_dicom(
            folder / f"slice{k:03d}.dcm", (vol[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16),
            SOPClassUID="1.2.840.10008.5.1.4.1.1.2", Modality="CT", StudyInstanceUID=study,
            SeriesInstanceUID=series_uid, FrameOfReferenceUID=frame, SeriesNumber=series, InstanceNumber=k + 1,
            ImagePositionPatient=[0.0, 0.0, float(k * spacing[2])], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[spacing[1], spacing[0]], SliceThickness=spacing[2], RescaleIntercept=-1024,
            RescaleSlope=1, **PHI,
        )  # fmt: skip
        import pydicom

        ds = pydicom.dcmread(folder / f"slice{k:03d}.dcm")
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(folder / f"slice{k:03d}.dcm")


def _ct_manifest(root: Path) -> Path:
    """Two CT series (from phantoms) in a hand-written manifest: train and test."""
    synthetic.make_ct3d(root / "nifti", 2, 2, shape=(24, 24, 16), single_lesion=True, questions_per_region=(1, 0),
                        question_style="phrase", test_fraction=0.0)  # fmt: skip
    records = []
    for i, split in enumerate(["train", "test"]):
        case = root / "nifti" / f"s{i:04d}"
        vol = np.asarray(nib.load(case / "ct.nii.gz").dataobj).astype(np.int16)
        mask = np.asarray(nib.load(case / "mask.nii.gz").dataobj) == 1
        series = root / "series" / f"series{i}"
        _ct_series(series, vol, (1.5, 1.5, 2.5), i + 1)
        records.append(GroundingRecord(
            id=f"ctseries/case{i}/1", dataset="ctseries", split=split, modality="CT", ndim=3, image=str(series),
            text="the lesion", boxes=(tuple(float(v) for v in mask_to_box(mask)),), spatial_shape=vol.shape,
            spacing=(1.5, 1.5, 2.5),
        ))  # fmt: skip
    out = root / "manifest"
    for split in ("train", "val", "test"):
        write_manifest(out / f"{split}.jsonl", [r for r in records if r.split == split])
    return out


def _outputs_with_phi(folder: Path) -> list[str]:
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes().lower()
        texts = [data]
        if path.suffix == ".png":
            with Image.open(path) as img:  # text chunks, also the compressed (zTXt/iTXt) ones
                texts.append(json.dumps(img.text).lower().encode())
        for needle in NEEDLES:
            if any(needle.lower().encode() in t for t in texts):
                hits.append(f"{path.relative_to(folder)}: {needle}")
    return hits


def test_identifiers_never_leave_the_dicom_files(tmp_path, caplog):
    from mg3d.bundle import BundleInference, export_bundle
    from mg3d.evaluation import GroundingEvaluator
    from mg3d.generation import RolloutConfig
    from mg3d.grounder import Grounder
    from mg3d.grounding import PromptConfig
    from mg3d.grpo.config import EvalConfig, OptimConfig, WarmStartConfig
    from mg3d.grpo.module import GRPOModule

    caplog.set_level(logging.DEBUG)
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    csv_path, image_root = _cxr_dicoms(inputs / "mscxr")
    ct_manifest = _ct_manifest(inputs / "ct")
    # the identifiers really are in the inputs, readable by the libraries mg3d uses
    assert all(n.lower().encode() in next(image_root.rglob("*.dcm")).read_bytes().lower() for n in NEEDLES)

    # 1. prepare_data (skip mode: the truncated DICOM is reported)
    code = prepare_main(["mscxr", "--csv", str(csv_path), "--image-root", str(image_root), "--image-ext", ".dcm",
                         "--out", str(out / "mscxr"), "--on-error", "skip", "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "mscxr" / "summary.json").read_text(encoding="utf-8"))
    assert summary["skipped"]["total"] == 1 and summary["records"]["total"] == 7

    # 2. a short training run: CSV logs, completion logs, disk cache, checkpoint
    sources = [
        SourceConfig(str(out / "mscxr"), name="mscxr", pipeline=PipelineConfig(spatial_size=(32, 40), fit="letterbox")),
        SourceConfig(str(ct_manifest), name="ct", pipeline=PipelineConfig(spatial_size=(16, 16, 8))),
    ]  # fmt: skip
    dm = GroundingDataModule(sources, batch_size=4, cache="disk", cache_dir=str(out / "cache"))
    module = GRPOModule(
        prompt=PromptConfig(template="terse", system_prompt="", max_vision_tokens=32),
        rollout=RolloutConfig(num_generations=2, max_new_tokens=8), rewards={"iou": 1.0},
        optim=OptimConfig(lr=1e-3, schedule="constant"), warm_start=WarmStartConfig(steps=1, lr=1e-3),
        evaluation=EvalConfig(enabled=True, max_samples=4, batch_size=4, sampled=False),
        log_completions_every_n_steps=1,
    )  # fmt: skip
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=pl.loggers.CSVLogger(out, name="logs"),
                         callbacks=[ckpt], plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False, default_root_dir=out)  # fmt: skip
    trainer.fit(module, dm)
    assert list(out.rglob("completions.jsonl")) and list(out.rglob("metrics.csv"))

    # 3. evaluation with overlays of 2D DICOMs and of a CT series
    grounder = Grounder.from_checkpoint(out / "ckpt" / "last.ckpt")
    records = [
        r
        for m in (out / "mscxr", ct_manifest)
        for s in ("train", "test")
        for r in read_manifest(m / f"{s}.jsonl")
    ]
    evaluator = GroundingEvaluator("mg3d", n_bootstrap=0)
    evaluator.update(grounder.predict_records(records, batch_size=4, progress=False))
    evaluator.write(out / "eval", gallery=2)
    pngs = list((out / "eval").rglob("*.png"))
    assert pngs and (out / "eval" / "predictions.jsonl").is_file()

    # 4. bundle export and the bundle's own inference on a DICOM radiograph and a CT series
    bundle = export_bundle(out / "ckpt" / "last.ckpt", out / "bundle")
    for image in (records[0].image, str(ct_manifest.parent / "series" / "series1")):
        written = BundleInference(str(bundle), image=image, phrase="the lesion", output_dir=str(out / "bundle_out"),
                                  batch_size=1).run()  # fmt: skip
        assert written

    # 5. nothing written, and nothing logged, holds an identifier
    assert sum(1 for p in out.rglob("*") if p.is_file()) > 30
    assert _outputs_with_phi(out) == []
    logged = "\n".join(r.getMessage() for r in caplog.records).lower()
    assert not [n for n in NEEDLES if n.lower() in logged]
