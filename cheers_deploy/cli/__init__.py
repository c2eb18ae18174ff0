"""The `cheers-deploy` command line (the top layer: it imports everything below, nothing imports it)."""

from .main import build_parser, main  # noqa: F401
