"""Markdown tables as the benchmarks print them (pasted into the README as they are)."""

import os


def print_load(start: float) -> None:
    """The machine's load average when the benchmark started and now: how far to trust its timings."""
    print(f"load average at start: {start:.2f}, at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")


def print_head(head: str, load: float) -> None:
    """Print the load line (`print_load(load)`), then a header row `| a | b |` and its `|---|---|` rule,
    each rule as wide as its column."""
    print_load(load)
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
