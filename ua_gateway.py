"""ua-gateway: the operations gateway for AI agent runs.

This module is the entry point (``python ua_gateway.py``, ``python -m ua_gateway``, the ``ua-gateway``
command and the zipapp's ``__main__``) and the public API for embedding::

    from ua_gateway import Config, Gateway

    gateway = Gateway(Config(port=0, workspaces="runs"), agent=my_agent)  # async def my_agent(turn): ...
    await gateway.start()
    ...
    await gateway.stop()

The server itself lives in the ``uagw`` package beside this file, one module per layer (see its
docstring for the module map). docs/PROTOCOL.md is the contract the code cites as "PROTOCOL.md §N".
"""

from __future__ import annotations

import importlib.util
import sys

if importlib.util.find_spec("websockets") is None:
    # The one dependency: vendored in the .pyz, installed by pip. A source checkout without it gets
    # what to do instead of a traceback.
    _MISSING = ("ua-gateway needs websockets 15.0.1: pip install websockets==15.0.1, "
                "or build the single file with python3 zipapp_build.py, which carries it")
    if __name__ == "__main__":
        sys.exit(f"ua-gateway: error: {_MISSING}")
    raise ModuleNotFoundError(_MISSING)

from uagw import __version__
from uagw.agents import AgentTurn
from uagw.app import Gateway
from uagw.cli import main, serve
from uagw.config import Config, ConfigError
from uagw.http11 import HttpError, Request, RequestParser, Response

__all__ = [
    "__version__",
    "AgentTurn",
    "Config",
    "ConfigError",
    "Gateway",
    "HttpError",
    "Request",
    "RequestParser",
    "Response",
    "main",
    "serve",
]


if __name__ == "__main__":
    sys.exit(main())
