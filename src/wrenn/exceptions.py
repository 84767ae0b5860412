"""Public alias of :mod:`wrenn._exceptions`, at the import path the published SDK uses."""

from wrenn._exceptions import *  # noqa: F403
from wrenn._exceptions import __all__ as __all__
