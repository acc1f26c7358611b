"""`python -m elas` and the `elas` command (pyproject's script): the CLI. Its imports (torch's) take seconds, and
a KeyboardInterrupt raised in the middle of them can leave a module half-imported and end in another error, so
during them Ctrl-C ends the process at once, with the one line cli.main prints for a Ctrl-C later on."""
import os
import signal
import sys


def _interrupted(signum, frame):
    os.write(2, b"elas: interrupted\n")
    os._exit(130)


def run() -> int:
    # (only where Ctrl-C would stop it anyway: a process started with SIGINT ignored, in the background of a
    # script, keeps ignoring it)
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    before = signal.signal(signal.SIGINT, _interrupted) if ours else None
    try:
        from .cli import main
    finally:
        if ours:
            signal.signal(signal.SIGINT, before)
    return main()


if __name__ == "__main__":
    sys.exit(run())
