"""`python -m elas` and the `elas` command (pyproject's script): the CLI. Its imports (torch's) take seconds, so a
Ctrl-C during them is one line too, as after them (cli.main)."""
import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("elas: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
