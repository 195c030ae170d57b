"""natrace: which native call sites of a live process hold unfreed memory."""

import os

__version__ = "0.1.0"


def main() -> None:
    """The `natrace` console script. A Ctrl-C while Python imports click and natrace
    (the first ~50 ms of every command) ends it with 130, as it would a moment later,
    instead of a KeyboardInterrupt traceback: nothing has been written yet."""
    try:
        from tracer import cli
        cli.main()
    except KeyboardInterrupt:
        os._exit(130)
