#!/usr/bin/env python
"""Prepare grounding manifests from a published data set: see `docs/data.md` and `--help`."""

import sys

from mg3d.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
