"""Kill and resume: ``scripts/train.py fit`` killed with SIGKILL (once mid-checkpoint-write, once at a seeded
random moment) and resumed with ``--ckpt_path last`` ends with the same weights as an uninterrupted run.

Also the unit behaviour of :mod:`mg3d.checkpointing`: atomic writes, stale temporaries, refusal of partial files.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mg3d.checkpointing import (
    AtomicCheckpointIO,
    atomic_torch_save,
    load_checkpoint_safely,
    remove_stale_temporaries,
    temporary_path,
    with_atomic_checkpoint_io,
)
from mg3d.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: configs/demo.yaml starts from the shipped pretrained policy (a path relative to the repository); these
#: tests train the tiny random-init model from another working directory
NO_CKPT = "--model.policy.checkpoint=null"
MAX_STEPS = 10
# The tiny random policy writes ~10 characters per completion: rewarding "at most 10" gives every group a reward
# spread, so every GRPO step moves the weights and a resume that replayed or skipped a batch would show.
REWARDS = {"format": {"mode": "lenient", "sanity_weight": 1.0, "min_think_chars": 0, "max_chars": 10}}


# ---------------------------------------------------------------------------------------------- unit


def test_atomic_save_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    atomic_torch_save({"w": torch.zeros(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt"]


def test_failed_save_keeps_previous_file(tmp_path):
    """An exception mid-write (the in-process analogue of a kill) leaves the old checkpoint untouched."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"step": 2, "bad": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "last.ckpt"
    mine, stale = temporary_path(target), temporary_path(target, pid=dead.pid)
    other_host = temporary_path(target, pid=dead.pid, host="other-host-7")
    live = temporary_path(target, pid=os.getppid())
    for p in (mine, stale, other_host, live):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert mine.exists() and other_host.exists() and live.exists()


def test_partial_checkpoint_is_refused_with_its_name(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"last\.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_plugin_is_added_once_and_steps_aside_for_other_checkpoint_io():
    assert isinstance(with_atomic_checkpoint_io(None)[0], AtomicCheckpointIO)
    mine = AtomicCheckpointIO()
    assert with_atomic_checkpoint_io([mine]) == [mine]
    assert with_atomic_checkpoint_io(None, strategy="xla") is None
    assert [type(p) for p in with_atomic_checkpoint_io("bf16-mixed")] == [str, AtomicCheckpointIO]


def test_cli_trainer_uses_atomic_checkpoint_io_and_a_fixed_checkpoint_folder(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mg3d.cli import main

    source = {"path": str(tmp_path / "none"), "pipeline": {"spatial_size": [28, 28, 8]}}
    own = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
           "init_args": {"dirpath": str(tmp_path / "mine"), "filename": "best"}}  # fmt: skip
    cli = main(
        ["--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT, f"--trainer.default_root_dir={tmp_path / 'run'}",
         f"--data.sources=[{json.dumps(source)}]", "--model.policy.num_layers=1", f"--trainer.callbacks+={json.dumps(own)}"],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    folders = sorted(str(cb.dirpath) for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint))
    # the default checkpoint gets the run's fixed folder (not the logger's version_N); a given dirpath is kept
    assert folders == [str(tmp_path / "mine"), str(tmp_path / "run" / "checkpoints")]


@pytest.mark.slow
@pytest.mark.e2e
def test_restarted_run_resumes_with_ckpt_path_last(phantoms, tmp_path):
    """Two invocations of ``scripts/train.py`` with the default checkpoint callback and the default loggers (whose
    ``version_N`` folder differs between the two): the second, given ``--ckpt_path last``, finds the first's
    ``last.ckpt`` in ``<default_root_dir>/checkpoints`` and continues from its step."""
    source = {"path": str(phantoms), "synthetic": None, "pipeline": {"spatial_size": [28, 28, 8]}}

    def run(max_steps: int, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT,
            f"--trainer.max_steps={max_steps}", "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.log_every_n_steps=1",
            "--model.warm_start.steps=2", "--model.steps_per_generation=1", "--model.rollout.num_generations=2",
            "--model.rollout.max_new_tokens=12", "--model.prompt.max_vision_tokens=32",
            "--model.evaluation.enabled=false", "--model.log_completions_every_n_steps=0",
            f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2", *extra,
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    last = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"  # demo.yaml: default_root_dir runs/demo
    run(4)
    assert _load(last)["global_step"] == 4
    second = run(6, "--ckpt_path", "last")
    assert f"Restoring states from the checkpoint path at {last}" in second.stdout + second.stderr
    assert _load(last)["global_step"] == 6
    logs = tmp_path / "runs" / "demo" / "lightning_logs"  # the loggers follow default_root_dir too
    versions = sorted(p.name for p in logs.iterdir())
    assert versions == ["version_0", "version_1"]  # where Lightning's default dirpath would have looked
    with (logs / "version_1" / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    steps = {int(r["step"]) for r in rows if r.get("step")}
    assert steps and min(steps) >= 4, f"the restarted run logged steps {sorted(steps)}"
    assert not any(r.get("sft/loss") for r in rows), "the restarted run repeated the warm start"


# ---------------------------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def phantoms(phantom_source) -> Path:
    return Path(phantom_source.path)


def _command(phantoms: Path, ckpt_dir: Path, resume: bool, keep_all: bool = False) -> list[str]:
    # No augmentation: jsonargparse merges this source into the config's (whose lateral flip would stay on), and
    # the augmentation stream restarts from its seed on resume (docs/reliability.md: exact resume covers the
    # sampler, model, optimiser and rollout streams, not random augmentations).
    pipeline = {"spatial_size": [28, 28, 8], "augment": {"lateral_flip_prob": 0.0}}
    source = {"path": str(phantoms), "synthetic": None, "pipeline": pipeline}
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 1,
                      "save_top_k": -1 if keep_all else 1},
    }  # fmt: skip
    return [
        sys.executable, str(ROOT / "scripts" / "train.py"), "fit", "--config", str(ROOT / "configs" / "demo.yaml"), NO_CKPT,
        f"--trainer.max_steps={MAX_STEPS}", "--model.warm_start.steps=2", "--model.steps_per_generation=1",
        "--model.rollout.num_generations=4", "--model.rollout.max_new_tokens=12", "--model.prompt.max_vision_tokens=32",
        f"--model.rewards={json.dumps(REWARDS)}",
        "--model.evaluation.enabled=false", "--model.log_completions_every_n_steps=0",
        f"--data.sources=[{json.dumps(source)}]", "--data.batch_size=2", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.callbacks=[{json.dumps(checkpoint)}]",
        *(["--ckpt_path", "last"] if resume else []),
    ]  # fmt: skip


ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _temporaries(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _wait(proc: subprocess.Popen, condition, timeout: float = 300.0, poll: float = 0.0005) -> bool:
    """Poll ``condition`` until it holds (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.kill()
    raise TimeoutError("training subprocess did not reach the expected point in time")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # this test's own child, by its id
    proc.wait(timeout=60)


def _saved_step(folder: Path) -> int:
    """The newest step whose checkpoint is complete (``epoch=E-step=S.ckpt``, renamed into place), or -1."""
    try:
        names = [e.name for e in os.scandir(folder)]
    except FileNotFoundError:
        return -1
    steps = [int(m.group(1)) for n in names if (m := re.fullmatch(r"epoch=\d+-step=(\d+)\.ckpt", n))]
    return max(steps, default=-1)


def _load(path: Path) -> dict:
    return load_checkpoint_safely(path)  # torch.load(weights_only=True), mg3d's allow-list


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_mid_write_and_at_random_moment_then_resume_matches_uninterrupted(phantoms, tmp_path):
    rng = random.Random(20240611)
    log = tmp_path / "train.log"

    # 1. the uninterrupted reference
    ref_dir = tmp_path / "reference" / "ckpt"
    ref_dir.parent.mkdir(parents=True)
    ref = subprocess.run(_command(phantoms, ref_dir, resume=False, keep_all=True), cwd=ref_dir.parent, env=ENV,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _load(ref_dir / "last.ckpt")
    assert reference["global_step"] == MAX_STEPS
    # the test has teeth: every step (warm start and GRPO) moved the weights, so a replayed or skipped batch,
    # a lost optimiser state or a reset sampling generator would change the final weights
    previous = None
    for step in range(1, MAX_STEPS + 1):
        path = next(ref_dir.glob(f"*-step={step}.ckpt"))
        weights = _load(path)["state_dict"]
        if previous is not None:
            assert any(not torch.equal(weights[k], previous[k]) for k in weights), (
                f"step {step} changed nothing"
            )
        previous = weights
        path.unlink()

    # 2. killed during the checkpoint write of a seeded step (in the warm start or the GRPO phase), up to 3 tries
    run_dir = tmp_path / "killed"
    ckpt_dir = run_dir / "ckpt"
    target = rng.randint(2, 6)
    mid_write_kills = 0
    for attempt in range(3):
        proc = _start(_command(phantoms, ckpt_dir, resume=attempt > 0), run_dir, log)
        before = set(_temporaries(ckpt_dir))

        def writing(before=before) -> bool:
            return _saved_step(ckpt_dir) >= target - 1 and bool(set(_temporaries(ckpt_dir)) - before)

        reached = _wait(proc, writing)
        _kill(proc)
        assert reached, (
            f"run ended before step {target} was written:\n{log.read_text(encoding='utf-8')[-3000:]}"
        )
        left = set(_temporaries(ckpt_dir))
        if left - before:
            mid_write_kills += 1
            interrupted = sorted(left - before)
            break
    assert mid_write_kills == 1, "never killed during a checkpoint write"
    # what a resume would load is complete; the partial write is only a hidden temporary
    killed_at = _load(ckpt_dir / "last.ckpt")["global_step"]
    # each step writes epoch=…-step=S.ckpt, then last.ckpt: the kill hit one of the two writes of step ≥ target - 1
    assert target - 2 <= killed_at < MAX_STEPS
    for ckpt in ckpt_dir.glob("*.ckpt"):
        _load(ckpt)

    # 3. resumed, then killed at a seeded random moment: a random delay after a seeded later step was saved
    second_target = rng.randint(killed_at + 1, MAX_STEPS - 2)
    proc = _start(_command(phantoms, ckpt_dir, resume=True), run_dir, log)
    reached = _wait(proc, lambda: _saved_step(ckpt_dir) >= second_target, poll=0.002)
    assert reached, log.read_text(encoding="utf-8")[-3000:]
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(proc)
    second = _load(ckpt_dir / "last.ckpt")["global_step"]
    assert killed_at < second < MAX_STEPS

    # 4. resumed to the end
    final = subprocess.run(_command(phantoms, ckpt_dir, resume=True), cwd=run_dir, env=ENV, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    assert _temporaries(ckpt_dir) == [], "temporaries of killed runs were not removed"
    resumed = _load(ckpt_dir / "last.ckpt")
    assert resumed["global_step"] == MAX_STEPS
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    for ref_opt, res_opt in zip(reference["optimizer_states"], resumed["optimizer_states"], strict=True):
        for pid, state in ref_opt["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(res_opt["state"][pid][name], value, rtol=0, atol=0)
    assert torch.equal(resumed["mg3d_sampling_rng"], reference["mg3d_sampling_rng"])
    print(
        f"killed while writing {interrupted} (last.ckpt at step {killed_at}, attempt {attempt + 1}), "
        f"then after step {second}; resumed to {MAX_STEPS}"
    )
