"""The `cutout` command's entry point: the CLI, or what to install for it.

The CLI's progress bars and tables come from rich, in the client's `cli` extra;
the library (`Client`, `AsyncClient`) needs none of it. Installed without the
extra, the command says how to get it instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

INSTALL_HINT = (
    "the `cutout` command needs the client's [cli] extra (rich): pip install 'cutout-client[cli]'"
)


def main(argv: Sequence[str] | None = None) -> None:
    if importlib.util.find_spec("rich") is None:
        sys.exit(INSTALL_HINT)
    from cutout.cli import main as cli_main

    cli_main(argv)
