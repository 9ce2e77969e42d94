"""What the peer comparison needs beyond lrpjax: PyTorch and Zennit (the ``peers`` extra),
imported only when a comparison is asked for."""

from __future__ import annotations

from typing import Any

__all__ = ["INSTALL_HINT", "PeerMissingError", "require_zennit"]

INSTALL_HINT = 'pip install "lrpjax[peers]"'


class PeerMissingError(ImportError):
    """PyTorch or Zennit is not installed; the message says how to install them."""


def require_zennit() -> tuple[Any, Any]:
    """Import PyTorch and Zennit, only when a comparison is asked for.

    Returns:
      ``(torch, zennit)``, the modules.

    Raises:
      PeerMissingError: either is missing, with the command that installs both.
    """
    try:
        import torch
        import zennit
        import zennit.attribution
        import zennit.canonizers
        import zennit.composites
        import zennit.rules
        import zennit.types
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise PeerMissingError(
            f"the comparison with Zennit needs PyTorch and Zennit ({missing} is not "
            f"installed): {INSTALL_HINT}"
        ) from None
    return torch, zennit
