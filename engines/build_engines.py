#!/usr/bin/env python3
"""Build TensorRT engines for an exported workdir (same as `cheers-deploy build`).

    python engines/build_engines.py --workdir work/tiny --precision fp32 --plugin-lib build/libcheers_plugins.so
"""
import sys

from cheers_deploy.cli.build import main

if __name__ == "__main__":
    sys.exit(main())
