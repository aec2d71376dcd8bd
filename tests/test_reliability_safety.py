"""Safe loading: no code in mg3d unpickles a file it is handed, and crafted pickles never run their payload.

A static audit (AST) checks every deserialising call in ``mg3d/`` and ``scripts/``. A payload whose unpickling
creates a marker file is hidden in checkpoints (torch zip and legacy pickle) passed to
``scripts/train.py fit --ckpt_path`` (with torch's ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, so mg3d cannot rely
on torch's default), to ``Grounder.from_checkpoint`` and to the atomic checkpoint IO; in model folders and
bundles given to ``Grounder.from_pretrained`` and ``load_bundle``; and in ``.npy`` arrays given to the
M3D-RefSeg npy adapter and to the DataModule. Each is refused with an error naming the file, and the marker
never appears.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mg3d.checkpointing import AtomicCheckpointIO
from mg3d.data import synthetic
from mg3d.data.datamodule import GroundingDataModule, SourceConfig
from mg3d.data.sources import M3DRefSegSource
from mg3d.data.transforms import PipelineConfig
from mg3d.errors import BundleError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: configs/demo.yaml starts from the shipped pretrained policy (a path relative to the repository); these
#: tests train the tiny random-init model from another working directory
NO_CKPT = "--model.policy.checkpoint=null"


class Payload:
    """Unpickling this object creates ``marker`` (what an attacker's ``__reduce__`` would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _crafted(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """A torch zip checkpoint and a legacy raw-pickle checkpoint, both shaped like Lightning's, with the payload."""
    state = {"state_dict": {"model.w": torch.zeros(2)}, "global_step": 1, "epoch": 0,
             "pytorch-lightning_version": "2.6.0", "hyper_parameters": {"policy": Payload(marker)}}  # fmt: skip
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save(state, zipped)
    legacy = tmp_path / "evil_legacy.ckpt"
    with legacy.open("wb") as handle:
        pickle.dump(state, handle, protocol=2)
    return {"zip": zipped, "legacy": legacy}


def test_payload_is_live(tmp_path):
    """The tests have teeth: loaded the unsafe way, each crafted file does create its marker."""
    marker = tmp_path / "live"
    crafted = _crafted(tmp_path, marker)
    torch.load(crafted["zip"], weights_only=False)  # the point is to show that the payload runs
    assert marker.exists()
    marker.unlink()
    pickle.loads(crafted["legacy"].read_bytes())
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- audit

# A call of one of these must pass the keyword with exactly this constant.
REQUIRED = {"torch.load": ("weights_only", True), "torch.serialization.load": ("weights_only", True),
            "numpy.load": ("allow_pickle", False)}  # fmt: skip
# Calls that deserialise code-bearing formats (or fetch remote code): never used on anything.
FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "pandas.read_pickle", "torch.jit.load", "torch.hub.load",
    "numpy.lib.format.read_array",
}  # fmt: skip
# Keyword values that switch a loader to unpickling or to running downloaded code, whatever the call.
FORBIDDEN_KEYWORDS = {"weights_only": False, "allow_pickle": True, "trust_remote_code": True}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def audit_source(text: str, where: str = "<source>") -> tuple[list[str], int]:
    """Violations of the safe-loading rules in one Python source, and the number of loader calls found safe.

    Import aliases are resolved (``import numpy as np``, ``from torch import load as L``), so ``np.load`` and
    ``L(...)`` are the calls they name.
    """
    tree = ast.parse(text)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    problems, safe = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        at = f"{where}:{node.lineno}"
        name = _dotted(node.func)
        if name is not None:
            head, _, rest = name.partition(".")
            name = ".".join(p for p in (aliases.get(head, head), rest) if p)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        for key, bad in FORBIDDEN_KEYWORDS.items():
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is bad:
                problems.append(f"{at}: {key}={bad}")
        if name in FORBIDDEN:
            problems.append(f"{at}: {name}(...) deserialises code-bearing data")
        elif name in REQUIRED:
            key, good = REQUIRED[name]
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is good:
                safe += 1
            else:
                problems.append(f"{at}: {name}(...) without {key}={good}")
    return problems, safe


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=flag)",
        "import torch\ntorch.load(p, **kwargs)",
        "from torch import load as L\nL(p, map_location='cpu')",
        "import torch.serialization\ntorch.serialization.load(p)",
        "import numpy as np\nnp.load(p)",
        "from numpy import load\nload(p, allow_pickle=True)",
        "import pickle\npickle.loads(b)",
        "from pickle import load\nload(f)",
        "import yaml\nyaml.load(text)",
        "import joblib\njoblib.load(p)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "loader(p, weights_only=False)",
    ],
)
def test_audit_catches_unsafe_loading(snippet):
    problems, _ = audit_source(snippet)
    assert problems, f"the audit missed: {snippet!r}"


def test_audit_accepts_safe_loading():
    snippet = "import torch, numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\n"
    assert audit_source(snippet) == ([], 2)


def test_every_deserialisation_in_mg3d_and_scripts_is_safe():
    """Every ``torch.load`` is weights-only, every ``np.load`` refuses pickles, nothing else unpickles."""
    sources = sorted((ROOT / "mg3d").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(sources) > 20
    problems, safe = [], 0
    for path in sources:
        found, ok = audit_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        problems += found
        safe += ok
    assert problems == []
    assert (
        safe >= 3
    )  # load_checkpoint_safely's torch.load, viz's and the adapters' np.load: the audit sees them


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_grounder_from_checkpoint_refuses_crafted_pickle(tmp_path, kind):
    from mg3d.grounder import Grounder

    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match=r"refused") as info:
        Grounder.from_checkpoint(_crafted(tmp_path, marker)[kind])
    assert f"evil_{kind}.ckpt" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_checkpoint_io_refuses_crafted_pickle_even_when_asked_for_full_unpickling(tmp_path, kind):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match=rf"evil_{kind}\.ckpt: refused"):
        AtomicCheckpointIO().load_checkpoint(_crafted(tmp_path, marker)[kind], weights_only=False)
    assert not marker.exists()


@pytest.fixture(scope="module")
def ct_phantoms(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "ct3d"
    GroundingDataModule([SourceConfig(
        str(folder), pipeline=PipelineConfig(spatial_size=(28, 28, 8)),
        synthetic={"kind": "ct3d", "n": 6, "seed": 1, "options": {"shape": [32, 32, 16], "single_lesion": True}},
    )]).prepare_data()  # fmt: skip
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_train_script_refuses_crafted_checkpoint(ct_phantoms, tmp_path, kind):
    """``scripts/train.py fit --ckpt_path evil.ckpt``: the run stops naming the file, and nothing is unpickled,
    even with torch told to unpickle fully by default."""
    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path, marker)[kind]
    source = {"path": str(ct_phantoms), "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT,
         "--trainer.max_steps=3", "--model.warm_start.steps=1", "--model.rollout.num_generations=2",
         "--model.prompt.max_vision_tokens=32", "--model.evaluation.enabled=false", "--trainer.logger=false",
         f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2", "--ckpt_path", str(evil)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2  # a one-line error naming the file, no traceback (scripts' bad-input contract)
    assert f"error: {evil}: refused" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- models and bundles


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real exported bundle of a small untrained policy (the weights' values do not matter here)."""
    from mg3d.bundle import export_bundle
    from mg3d.grounder import Grounder
    from mg3d.model import PolicyConfig

    policy = PolicyConfig(hidden_size=64, intermediate_size=128, num_layers=1, vision_depth=1, vision_hidden=32,
                          vision_intermediate=64).build()  # fmt: skip
    return export_bundle(Grounder(policy), tmp_path_factory.mktemp("bundle") / "small", name="safety test")


def _weights_as_pickle(folder: Path, marker: Path, name: str = "model.safetensors") -> None:
    """Replace the safetensors weights with a torch.save file carrying the payload (under ``name``)."""
    (folder / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(2), "trap": Payload(marker)}, folder / name)


def test_from_pretrained_refuses_pickled_weights(bundle, tmp_path):
    """A model folder whose weights are a pickle (``pytorch_model.bin``) is refused, naming the file."""
    from mg3d.grounder import Grounder

    folder = shutil.copytree(bundle / "models", tmp_path / "model")
    marker = tmp_path / "pwned"
    _weights_as_pickle(folder, marker, "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"refused — pytorch_model\.bin cannot be loaded weights-only"):
        Grounder.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("disguise", ["as_safetensors", "as_json", "zipped_bundle"])
def test_load_bundle_refuses_crafted_pickle(bundle, tmp_path, disguise):
    """The payload as the bundle's weights, disguised as a JSON file, or inside a bundle zip: refused, naming
    the file, before anything is loaded."""
    from mg3d.bundle import load_bundle

    root = shutil.copytree(bundle, tmp_path / "bundle")
    marker = tmp_path / "pwned"
    if disguise == "as_json":
        (root / "models" / "preprocessor_config.json").write_bytes(pickle.dumps(Payload(marker), protocol=4))
        named = "models/preprocessor_config.json"
    else:
        _weights_as_pickle(root / "models", marker)
        named = "models/model.safetensors"
    target: Path = root
    if disguise == "zipped_bundle":
        target = tmp_path / "bundle.zip"
        with zipfile.ZipFile(target, "w") as archive:
            for path in sorted(root.rglob("*")):
                archive.write(path, Path("bundle") / path.relative_to(root))
    with pytest.raises(BundleError, match=rf"refused — {named} may be a pickle"):
        load_bundle(target)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- arrays


@pytest.fixture
def npy_cases(tmp_path) -> tuple[Path, Path]:
    """M3D-RefSeg's preprocessed npy layout, with one case's ct.npy replaced by a pickled object array."""
    synthetic.make_ct3d(tmp_path / "m3d", 4, 0, npy=True, npy_shape=(8, 16, 16), shape=(24, 24, 16),
                        single_lesion=True, questions_per_region=(1, 0), question_style="phrase")  # fmt: skip
    npy_root = tmp_path / "m3d" / "M3D_RefSeg_npy"
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    np.save(npy_root / "s0001" / "ct.npy", evil, allow_pickle=True)
    return npy_root, marker


def test_npy_adapter_refuses_pickled_array(npy_cases):
    npy_root, marker = npy_cases
    source = M3DRefSegSource(npy_root, variant="npy", on_error="skip")
    records = list(source)
    assert records and all("/s0001/" not in r.id for r in records)
    reasons = [s.reason for s in source.skips.items]
    assert reasons and all("s0001/ct.npy: holds Python objects" in r for r in reasons), reasons
    assert not marker.exists()


def test_datamodule_refuses_pickled_array_swapped_in_after_preparation(npy_cases, tmp_path):
    """The file was a valid array at preparation time and became a pickle later: refused at fit, not run."""
    from mg3d.data.prepare import prepare

    npy_root, marker = npy_cases
    evil = (npy_root / "s0001" / "ct.npy").read_bytes()
    np.save(npy_root / "s0001" / "ct.npy", np.zeros((1, 8, 16, 16), np.float32))
    prepare([M3DRefSegSource(npy_root, variant="npy", test_fraction=0.0, val_fraction=0.0)], tmp_path / "man",
            progress=False)  # fmt: skip
    (npy_root / "s0001" / "ct.npy").write_bytes(evil)
    pipeline = PipelineConfig(spatial_size=(8, 16, 16), axcodes=None, pixdim=None)
    dm = GroundingDataModule([SourceConfig(str(tmp_path / "man"), pipeline=pipeline)], on_error="skip")
    dm.setup("fit")
    assert [s["id"].split("/")[1] for s in dm.skipped] == ["s0001"]
    assert "s0001/ct.npy: holds Python objects" in dm.skipped[0]["reason"]
    assert not marker.exists()
