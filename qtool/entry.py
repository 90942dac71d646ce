"""The `qtool` console script: signal handlers first, then everything else.

Kept free of imports beyond the standard library and qtool.signals, so that Ctrl-C or SIGTERM in the
first moments of a run (while typer, rich and torch load) is already handled.
"""
import json
import sys

from qtool import signals
from qtool.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated


def main() -> None:
    try:
        signals.install()
        from qtool.cli import run
    except KeyboardInterrupt as exc:   # a signal before the CLI's own handling exists: nothing was written
        terminated = isinstance(exc, Terminated)
        code, kind = (EXIT_TERMINATED, "Terminated") if terminated else (EXIT_INTERRUPTED, "Interrupted")
        message = f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; nothing was written"
        sys.stderr.write(f"error: {message}\n")
        if "--json" in sys.argv[1:]:
            sys.stdout.write(json.dumps({"error": {"exit_code": code, "type": kind, "message": message}}) + "\n")
        raise SystemExit(code) from None
    run()
