"""Markdown tables as the benchmarks print them (pasted into the README as they are)."""


def print_head(head: str) -> None:
    """Print a header row `| a | b |` and its `|---|---|` rule, each rule as wide as its column."""
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
