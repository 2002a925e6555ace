"""Running set-up work whose memory is transient (tokenising a data set) away from the
training thread's malloc heap.

glibc's malloc gives each new thread its own arena. A tokenizer (the `tokenizers`
library, in Rust, allocating through the same malloc) grows the heap of the thread that
calls it: tokenising BBC News's 1,781 training articles takes glibc's main heap from 150
to about 290 MiB, nearly all of it freed once the token ids are kept. The free space
stays inside the heap (live blocks above it pin it); `malloc_trim` hands its pages back,
but training then allocates its small blocks all over those holes, touching the pages
again. On minilm full fine-tuning (batch 16 x 128, checkpoint + norm 0.1 + step in
backward, glibc with cotune's "release" settings) the peak RSS was 829 MiB with
tokenising on the main thread and 792 MiB with it aside; `none` 1,308 and 1,277 MiB
(`benchmarks/device_memory.py`).

`aside(fn)` runs `fn` on a short-lived helper thread and waits for it: the tokenizer's
transient blocks land in that thread's arena, which training never allocates from.
What `fn` returns (the token ids) outlives the thread; other allocators (jemalloc, musl)
are unaffected.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def aside(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run on a helper thread (with the caller's context variables) that the
    caller waits for; its result is returned and its exception re-raised as it was."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        context = contextvars.copy_context()
        outcome: list[R] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                outcome.append(context.run(fn, *args, **kwargs))
            except BaseException as exc:  # re-raised on the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=target, name=f"cotune-aside-{fn.__name__}")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    return run
