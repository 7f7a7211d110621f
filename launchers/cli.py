"""The ``longreach`` command line (placeholder until the CLI lands)."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("longreach", file=sys.stderr)
    return 0
