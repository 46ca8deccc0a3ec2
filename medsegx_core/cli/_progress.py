"""The command line's progress bar: a tqdm bar on stderr driven by the engine's ``progress(fraction, message)``."""
from __future__ import annotations

import sys


def progress_bar(description: str):
    """``(bar, update)``: ``update`` is a ``ProgressCallback``; close ``bar`` when the work ends."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}|{postfix}")

    def update(fraction: float, message: str = "") -> None:
        bar.n = round(100 * fraction)
        bar.set_postfix_str(message, refresh=True)

    return bar, update
