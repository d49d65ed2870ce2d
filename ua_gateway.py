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
import os
import sys

if __name__ == "__main__" and importlib.util.find_spec("uagw") is None:
    # ``python3 -I ua_gateway.py`` (isolated mode) leaves the script's directory off sys.path; the
    # ``uagw`` package of a source checkout is beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("websockets") is None:
    # The one dependency, which only serving needs: vendored in the .pyz, installed by pip. Run from a
    # source checkout without it, the command line still gives --help, --version and the client
    # commands, and says what to do when asked to serve; imported, the public API cannot work without it.
    from uagw.cli import WEBSOCKETS_MISSING, main

    if __name__ == "__main__":
        sys.exit(main())
    raise ModuleNotFoundError(WEBSOCKETS_MISSING)

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
