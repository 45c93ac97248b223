"""Command-line interface (placeholder until the engine lands)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liveupgrade")
    parser.parse_args(argv)
    return 0
