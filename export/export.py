#!/usr/bin/env python3
"""Export a Cheers checkpoint to ONNX graphs + manifest.json (same as `cheers-deploy export`).

    python export/export.py --checkpoint CKPT --out work/tiny [--max-context 2048] [--force]
"""
import sys

from cheers_deploy.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
