"""Progress bars for the command line, and what ``--quiet`` silences.

Bars go to stderr (tqdm) and appear only once a step has run for :data:`BAR_DELAY_S` seconds, so
quick steps print nothing. :func:`loading` ticks while a model loads, :func:`token_progress`
follows the engine's forward calls (reading the prompt, then generating), and
:func:`silence_third_party` is ``--quiet`` for the libraries: transformers' bars (weight loading,
GGUF de-quantising), its warnings and the deprecation notices it emits.
"""

from __future__ import annotations

import functools
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

BAR_DELAY_S = 1.0  # a bar shows up only once its step has taken this long
_TICK_S = 0.5


@contextmanager
def loading(description: str, enabled: bool = True) -> Iterator[None]:
    """A ticking "description: 12s" line while the block runs (a model load has no known total)."""
    if not enabled:
        yield
        return
    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", delay=BAR_DELAY_S, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(_TICK_S):
            if bar.format_dict["elapsed"] >= BAR_DELAY_S:
                bar.refresh()

    thread = threading.Thread(target=tick, name="namm-loading-bar", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


@contextmanager
def token_progress(model, n_prompt: int, max_new_tokens: int, enabled: bool = True) -> Iterator[None]:
    """Bars for reading an ``n_prompt``-token prompt and generating up to ``max_new_tokens``.

    Counts the tokens of the engine's own forward calls on ``model`` (those carrying its
    ``namm_hook``): the prompt's chunks first, then one call per decoded token (the first new token
    comes from the prompt's last logits, so it counts when the prompt is read).
    """
    if not enabled:
        yield
        return
    reading = tqdm(total=n_prompt, desc="reading prompt", unit="tok", delay=BAR_DELAY_S, dynamic_ncols=True)
    bars = [reading]

    def count(module, args, kwargs) -> None:
        if "namm_hook" not in kwargs:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = int(ids.shape[-1]) if ids is not None else 0
        if reading.n < n_prompt:
            reading.update(min(n, n_prompt - reading.n))
            if reading.n >= n_prompt:
                bars.append(tqdm(total=max_new_tokens, initial=1, desc="generating", unit="tok",
                                 delay=BAR_DELAY_S, dynamic_ncols=True))
        elif len(bars) > 1:
            bars[-1].update(n)

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for bar in bars:
            bar.close()


def generation_progress(engine, prompt, max_new_tokens: int, chat: bool | None = None, policy=None,
                        enabled: bool = True):
    """:func:`token_progress` for ``engine.generate(prompt, max_new_tokens, chat=chat, policy=policy)``."""
    n_prompt = engine.encode(prompt, engine.chat_for(chat, policy)).numel() if enabled else 0
    return token_progress(engine.model, n_prompt, max_new_tokens, enabled)


def silence_third_party() -> None:
    """``--quiet`` for the libraries: no transformers progress bars (weights, GGUF de-quantising),
    no transformers warnings, no FutureWarning / DeprecationWarning notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    try:  # the GGUF loader uses a bare tqdm that disable_progress_bar() does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:
        return
    if not isinstance(gguf_loader.tqdm, functools.partial):
        gguf_loader.tqdm = functools.partial(gguf_loader.tqdm, disable=True)


__all__ = ["BAR_DELAY_S", "generation_progress", "loading", "silence_third_party", "token_progress"]
