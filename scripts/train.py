"""Train, validate, test or predict with mg3d's LightningCLI.

python scripts/train.py fit --config configs/demo.yaml
python scripts/train.py fit --config configs/demo.yaml --print_config
python scripts/train.py fit --config my_run.yaml --imports my_presets.py   # user code (docs/extending.md)

A bad setting or data item stops the run with a one-line ``error: …`` naming it, exit code 2.
"""

import sys

from mg3d.cli import main
from mg3d.errors import Mg3dError

if __name__ == "__main__":
    try:
        main()
    except Mg3dError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
