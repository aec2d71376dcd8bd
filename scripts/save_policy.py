#!/usr/bin/env python
"""Write the policy of a training checkpoint as a model folder that another run can start from.

    python scripts/save_policy.py --ckpt runs/demo_pretrain/checkpoints/last.ckpt --out pretrained/ct3d_body_tiny

The folder is ``Grounder.save_pretrained``'s (safetensors weights, tokenizer, image processor,
``mg3d_inference.json``) plus ``mg3d_provenance.json``: the checkpoint it came from, its step and the held-out
results it recorded, so a shipped policy says how it was made. Point ``model.policy.checkpoint`` at the folder
(``configs/demo.yaml`` does: the demo starts GRPO from the policy ``make demo-pretrain`` writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mg3d.errors import Mg3dError

PROVENANCE_NAME = "mg3d_provenance.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a Lightning checkpoint of GRPOModule")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write (replaced files)")
    parser.add_argument("--made-by", default=None, help="the command or config that trained the checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mg3d.grounder import Grounder  # after argument parsing: --help stays fast

    try:
        grounder = Grounder.from_checkpoint(args.ckpt)
        folder = grounder.save_pretrained(args.out)
    except Mg3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = grounder.checkpoint_info
    provenance = {
        "checkpoint": Path(str(info.get("path", args.ckpt))).name,
        "global_step": info.get("global_step"),
        "made_by": args.made_by,
        "eval_results": info.get("eval_results", {}),
    }
    (folder / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {folder} (step {provenance['global_step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
