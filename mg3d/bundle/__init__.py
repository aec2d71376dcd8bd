"""MONAI bundle export of a grounding model, its checks, and the inference workflow the bundle runs.

Layout written by :func:`export_bundle` (MONAI bundle specification, research/data_formats.md §2.6)::

    <bundle>/configs/metadata.json    MONAI metadata + ``schema`` + an ``mg3d`` section (SHA-256 of every file)
    <bundle>/configs/inference.json   a MONAI config whose ``run`` instantiates :class:`BundleInference`
    <bundle>/models/                  model.safetensors, config.json, tokenizer, preprocessor_config.json,
                                      mg3d_inference.json (prompt, generation and pipeline settings) — no pickles
    <bundle>/docs/README.md, LICENSE

MONAI's own tools verify and run it (``verify_metadata`` against the schema shipped in
``mg3d/resources``, so no network is needed; ``run`` with the inputs as overrides). The spec's
``models/model.pt`` is deliberately absent: a ``.pt`` file is a pickle, and mg3d never asks users to unpickle
what they are handed (DESIGN.md §6). :func:`load_bundle` refuses a bundle with a pickle, a missing or changed
file, an unexpected file in ``models/``, or metadata of the wrong shape, each with a :class:`BundleError`
that says which.

Security note for users: MONAI evaluates ``_target_`` and ``$`` expressions of a config file, so run only
bundles whose ``configs/inference.json`` you trust; mg3d's loader itself executes nothing from the bundle.

Layout of this package (one job per module): :mod:`~mg3d.bundle.verify` is the bundle format and the checks that
guard loading it (:func:`verify_bundle`, :func:`load_bundle`); :mod:`~mg3d.bundle.export` writes a bundle
(:func:`export_bundle`; the README and LICENSE prose are templates in ``mg3d/resources``);
:mod:`~mg3d.bundle.inference` is what a bundle runs (:class:`BundleInference`, :func:`read_inputs`). Exported
bundles name ``mg3d.bundle.BundleInference`` in ``configs/inference.json``, so that path stays importable here.
"""

from mg3d.bundle.export import export_bundle
from mg3d.bundle.inference import BundleInference, read_inputs
from mg3d.bundle.verify import (
    BUNDLE_FORMAT,
    SCHEMA_ID,
    SCHEMA_PATH,
    load_bundle,
    schema_sha256,
    verify_bundle,
)

__all__ = [
    "BUNDLE_FORMAT",
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "BundleInference",
    "export_bundle",
    "load_bundle",
    "read_inputs",
    "schema_sha256",
    "verify_bundle",
]
