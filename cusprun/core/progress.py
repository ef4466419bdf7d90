"""Progress bars for long work (``--quiet`` turns them off): tokens through a layer-major pass, or items."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total_tokens: int, desc: str, disable: bool) -> tqdm:
    """A token-counting bar for a layer-major scoring pass (see :func:`advance`)."""
    return tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, file=sys.stderr, disable=disable,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} tok [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def advance(bar: tqdm, n_docs: int, n_layers: int, layer: int, doc: int, n_tokens: int) -> None:
    """Documents pass the model layer by layer: a document's tokens count 1/n_layers per layer."""
    bar.token_layers = getattr(bar, "token_layers", 0) + n_tokens  # exact count: float sums would overshoot
    bar.set_postfix_str(f"{n_docs} docs, layer {layer + 1}/{n_layers}", refresh=False)
    bar.update(bar.token_layers / n_layers - bar.n)


def item_bar(total: int, desc: str, unit: str, disable: bool) -> tqdm:
    """A bar counting whole items (documents, models) on stderr."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True)
