"""The `qtool` console script: signal handlers first, then everything else.

Kept free of imports beyond the standard library and qtool.signals, so that Ctrl-C or SIGTERM in the
first moments of a run (while typer, rich and torch load) is already handled.
"""
from qtool import signals


def main() -> None:
    signals.install()
    from qtool.cli import run

    run()
