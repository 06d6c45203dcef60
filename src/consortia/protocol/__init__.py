"""Wire schemas shared by coordinator, site and CLI: the contract between processes."""

from consortia.protocol.schemas import *  # noqa: F403
from consortia.protocol.schemas import __all__  # noqa: F401
