"""PET activity → standardised uptake value (SUV, body-weight), the unit the ``PET`` preset expects.

``SUV = C · W / D(t)``: ``C`` the activity concentration in Bq/ml (counts × a calibration factor when the
scanner stores counts), ``W`` the patient's weight in grams (1 g of tissue taken as 1 ml), ``D(t)`` the
injected dose in Bq decayed from the injection time to the scan start, ``D · 2^(-Δt / T½)`` — the reference
time of images decay-corrected to the scan start (DICOM ``DecayCorrection = START``). Why here: the preset
clips SUV to ``[0, suv_max]``; raw Bq/ml (thousands) through it would be a white volume.

Inputs a user gives per case (``docs/data.md``, the own-data importer's columns): ``injected_dose_bq``,
``patient_weight_kg``, ``injection_time``, ``scan_time`` (``HH:MM:SS``, DICOM ``HHMMSS.ffffff`` or ISO date-time),
optionally ``half_life_s`` (default ¹⁸F, 6586.2 s) and, for ``CNTS`` images, ``bqml_per_count``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path

from mg3d.errors import DataError

__all__ = ["F18_HALF_LIFE_S", "PET_UNITS", "parse_clock", "suv_factor", "write_suv_image"]

#: Half-life of fluorine-18 in seconds (109.77 min), the usual PET tracer.
F18_HALF_LIFE_S = 6586.2
#: Units a PET image may be stored in: activity concentration, or counts with a calibration factor.
PET_UNITS = ("BQML", "CNTS")


def parse_clock(value: str, what: str) -> dt.datetime:
    """A time of day (``HH:MM:SS``, DICOM ``HHMMSS[.ffffff]``) or an ISO date-time; times of day get a fixed date."""
    text = str(value).strip()
    try:
        if "T" in text or "-" in text:
            return dt.datetime.fromisoformat(text)
        if ":" in text:
            clock = dt.time.fromisoformat(text)
        else:
            whole, _, frac = text.partition(".")
            if len(whole) != 6 or not whole.isdigit():
                raise ValueError(text)
            micro = int((frac + "000000")[:6]) if frac else 0
            clock = dt.time(int(whole[:2]), int(whole[2:4]), int(whole[4:6]), micro)
    except ValueError:
        raise DataError(f"{what}: not a time (HH:MM:SS, HHMMSS or an ISO date-time): {value!r}") from None
    return dt.datetime.combine(dt.date(2000, 1, 1), clock)


def suv_factor(
    injected_dose_bq: float,
    patient_weight_kg: float,
    injection_time: str,
    scan_time: str,
    *,
    half_life_s: float = F18_HALF_LIFE_S,
    what: str = "PET",
) -> float:
    """The factor that turns Bq/ml into body-weight SUV: ``weight_g / (dose · 2^(-Δt / T½))``."""
    for name, value in (("injected_dose_bq", injected_dose_bq), ("patient_weight_kg", patient_weight_kg),
                        ("half_life_s", half_life_s)):  # fmt: skip
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise DataError(f"{what}: {name} must be a positive number, got {value!r}")
    start, scan = (
        parse_clock(injection_time, f"{what}: injection_time"),
        parse_clock(scan_time, f"{what}: scan_time"),
    )
    elapsed = (scan - start).total_seconds()
    if elapsed < 0:
        raise DataError(f"{what}: scan_time {scan_time!r} is before injection_time {injection_time!r}")
    decayed = injected_dose_bq * 2.0 ** (-elapsed / half_life_s)
    return patient_weight_kg * 1000.0 / decayed


def write_suv_image(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    factor: float,
    *,
    units: str = "BQML",
    bqml_per_count: float | None = None,
    what: str = "PET",
) -> Path:
    """Write ``image`` (any format SimpleITK reads, a DICOM series folder included) as float32 SUV NIfTI at
    ``out``, same voxel grid and geometry, so masks and boxes of the original stay valid."""
    import SimpleITK as sitk

    if units not in PET_UNITS:
        raise DataError(f"{what}: PET units must be one of {list(PET_UNITS)}, got {units!r}")
    scale = float(factor)
    if units == "CNTS":
        if bqml_per_count is None or not bqml_per_count > 0:
            raise DataError(f"{what}: an image in counts (CNTS) needs a positive bqml_per_count")
        scale *= float(bqml_per_count)
    src = Path(image)
    try:
        if src.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(src))
    except RuntimeError as err:
        raise DataError(f"{what}: cannot read {src}: {str(err).strip().splitlines()[-1]}") from None
    suv = sitk.Cast(img, sitk.sitkFloat32) * scale
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(suv, str(target))
    return target
