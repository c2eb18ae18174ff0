#!/usr/bin/env python
"""Thin wrapper: `python calibration/calibrate.py capture|quantize|convert|sweep|report --workdir W ...`
(same as `cheers-deploy calibrate ...`; see calibration/README.md and docs/precision.md)."""
import sys

from cheers_deploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
