"""`aside`: set-up work on a helper thread, results and errors as if called directly."""

from __future__ import annotations

import contextvars
import threading

import pytest

from cotune.data.aside import aside
from cotune.data.encode import encode
from cotune.data.task import Example
from cotune.errors import DataError

_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="unset")


def test_runs_on_another_thread_and_returns_its_result() -> None:
    caller = threading.get_ident()

    @aside
    def where(x: int, *, y: int) -> tuple[int, int]:
        return threading.get_ident(), x + y

    ident, value = where(2, y=3)
    assert value == 5
    assert ident != caller
    assert where.__name__ == "where"


def test_reraises_the_original_exception() -> None:
    @aside
    def bad() -> None:
        raise DataError("row 3: no label")

    with pytest.raises(DataError, match="row 3: no label"):
        bad()


def test_sees_the_callers_context_variables() -> None:
    @aside
    def read() -> str:
        return _TAG.get()

    token = _TAG.set("set by the caller")
    try:
        assert read() == "set by the caller"
    finally:
        _TAG.reset(token)


class _Tok:
    """A minimal tokenizer recording which thread called it."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict:
        self.threads.add(threading.get_ident())
        return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}


def test_encode_tokenises_off_the_calling_thread() -> None:
    tok = _Tok()
    ds = encode([Example("a bb ccc", None, 1), Example("dddd", None, 0)], tok, max_len=2)
    assert [list(ds[i]["input_ids"]) for i in range(2)] == [[1, 2], [4]]
    assert [ds[i]["labels"] for i in range(2)] == [1, 0]
    assert tok.threads and threading.get_ident() not in tok.threads
