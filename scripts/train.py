"""Train, validate, test or predict with mg3d's LightningCLI.

python scripts/train.py fit --config configs/demo.yaml
python scripts/train.py fit --config configs/demo.yaml --print_config
"""

from mg3d.cli import main

if __name__ == "__main__":
    main()
