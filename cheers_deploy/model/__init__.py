"""Plain-PyTorch reference of Cheers with the official parameter names (docs/architecture.md §2-§11, §16).

Importing this package needs torch (``pip install cheers-deploy[torch]``).
"""
from ..errors import require_torch

require_torch()

from .cheers import CheersModel  # noqa: E402

__all__ = ["CheersModel"]
