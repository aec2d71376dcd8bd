#!/usr/bin/env python
"""Generation on an FSDP2-sharded policy, 2 CPU processes (gloo): weights gathered once per rollout vs per token.

Run by hand (writes its section of docs/benchmarks.md unless --no-write)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/sharded_generation.py

It runs the comparison of ``tests/test_sharding.py`` (the same code, so the numbers are those of a passing
check) with longer completions: each rank generates greedily on the sharded tiny policy twice, once with FSDP's
own hooks (every unit all-gathered at every decoding step) and once inside ``mg3d.sharding.gathered_parameters``
(every unit all-gathered once), and reports both times and all-gather counts in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Generation on sharded weights (`bench/sharded_generation.py`)"


def write_section(rows: list[dict], new_tokens: int) -> None:
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, 2 processes × 1 torch thread, gloo (other jobs shared the machine). Command: "
        "`OMP_NUM_THREADS=1 .venv/bin/python bench/sharded_generation.py`. The tiny policy sharded by "
        f"`mg3d.sharding.shard_policy` ({rows[0]['units']} FSDP2 units: {rows[0]['decoder_layers']} decoder layers, "
        f"the vision blocks, the root); 2 video prompts, greedy, {new_tokens} new tokens "
        f"({rows[0]['decode_steps']} decoding steps). Completions are identical in both modes and to the unsharded "
        "model's.",
        "",
        "| rank | per-token gathering: all-gathers | time | gathered once: all-gathers | time | time ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = r["gathered_seconds"] / r["per_token_seconds"]
        lines.append(
            f"| {r['rank']} | {r['per_token_gathers']} | {r['per_token_seconds']:.2f} s | {r['greedy_gathers']} | "
            f"{r['gathered_seconds']:.2f} s | **{ratio:.2f}×** |"
        )
    lines += [
        "",
        "On one CPU host gloo's all-gather is a memory copy, so the ratio here understates what gathering once saves "
        "across GPUs or nodes, where every per-token all-gather crosses the interconnect; the all-gather counts are "
        "what carries over.",
        "",
    ]
    block = "\n".join(lines)
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per completion")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sharding import run_two_processes

    with tempfile.TemporaryDirectory() as tmp:
        rows = run_two_processes(Path(tmp), new_tokens=args.new_tokens)
    for r in rows:
        if not (r["greedy_equal"] and r["per_token_equal"]):
            raise SystemExit(f"rank {r['rank']}: sharded completions differ from the unsharded model's: {r}")
        keys = ("rank", "per_token_gathers", "per_token_seconds", "greedy_gathers", "gathered_seconds")
        print({k: r[k] for k in keys})
    if not args.no_write:
        write_section(rows, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
