"""Where device memory goes: exact state sizes, live saved activations, the breakdown's
arithmetic, the allocator choice, and `cotune memory` end to end on minilm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cotune.memory.allocator import HeapStats, heap_stats
from cotune.memory.measure import (
    LIVE_SAVED,
    HeapSampler,
    MemoryBreakdown,
    RestPoint,
    Sample,
    SavedTensorMeter,
    breakdown,
    model_state_bytes,
    resident_bytes,
)

ROOT = Path(__file__).resolve().parents[1]


def test_model_state_bytes_counts_parameters_gradients_and_adamw_state() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 3, bias=False))
    model[1].weight.requires_grad_(False)  # frozen: a parameter, but no gradient or state
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    n_all = 10 * 20 + 20 + 20 + 20 + 20 * 3
    n_train = n_all - 20
    before = model_state_bytes([model], opt)
    assert before == {"parameters": 4 * n_all, "parameters_mapped": 0,
                      "gradients": 4 * n_train, "optimizer_state": 0}  # fmt: skip
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    after = model_state_bytes([model], opt)
    # two moments per trainable parameter, plus one scalar step counter per tensor
    assert after["optimizer_state"] == 2 * 4 * n_train + 4 * 4
    assert after["parameters"] == before["parameters"]


def test_live_saved_bytes_rise_in_forward_and_return_to_zero_after_backward() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(32, 64)
    base = LIVE_SAVED.bytes
    with SavedTensorMeter(model.parameters()) as meter:
        y = model(x).pow(2).sum()
    live = LIVE_SAVED.bytes - base
    # Linear 1 keeps x, GELU keeps its input, Linear 2 keeps the GELU output, pow keeps
    # its input: 32 x (64 + 256 + 256 + 64) floats, each storage once
    assert meter.bytes == 4 * 32 * (64 + 256 + 256 + 64)
    assert live == meter.bytes
    y.backward()
    del y
    assert LIVE_SAVED.bytes == base


def test_sampler_sees_gradients_and_saved_activations() -> None:
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    params = list(model.parameters())
    with SavedTensorMeter(params):
        loss = model(torch.randn(64, 256)).sum()
    with HeapSampler(params, interval_s=0.0005) as sampler:
        held = LIVE_SAVED.bytes
        sampler._sample()  # the forward's saves are alive here
        assert sampler.peak is not None and sampler.peak.saved_live == held > 0
        loss.backward()
        sampler.peak = None
        sampler._sample()
    grads = sum(p.numel() * 4 for p in params)
    assert sampler.peak is not None and sampler.peak.grads_live == grads


def test_breakdown_arithmetic() -> None:
    mib = 1 << 20
    sampler = HeapSampler()
    sampler.start = HeapStats(in_use=300 * mib, free_held=5 * mib)
    sampler.peak = Sample(rss=900 * mib, heap=HeapStats(in_use=700 * mib, free_held=45 * mib),
                          saved_live=250 * mib, grads_live=80 * mib)  # fmt: skip
    rest = RestPoint(rss=200 * mib, heap=HeapStats(in_use=50 * mib, free_held=5 * mib))
    state = {"parameters": 100 * mib, "parameters_mapped": 40 * mib,
             "gradients": 100 * mib, "optimizer_state": 120 * mib}  # fmt: skip
    b = breakdown(905 * mib, sampler, state, rest)
    assert b == MemoryBreakdown(
        peak_rss=905 * mib, runtime_at_rest=200 * mib, parameters=100 * mib,
        optimizer_state=120 * mib, gradients=80 * mib, saved_activations=250 * mib,
        transient=(700 - 300 - 250 - 80) * mib,
        data_and_other=(300 - 50 - (100 - 40) - 120) * mib,
        allocator_retention=15 * mib,
    )  # fmt: skip
    # glibc's 40 MiB of free bytes do not all fit under the peak: retention is capped at
    # the remainder (905 - 890), so the parts add up to the peak exactly
    assert b.as_dict()["unexplained"] == 0
    roomy = breakdown(1000 * mib, sampler, state, rest)
    assert roomy is not None and roomy.allocator_retention == 40 * mib
    assert roomy.as_dict()["unexplained"] == (1000 - 890 - 40) * mib
    # off glibc there are no heap counters, hence no breakdown
    sampler.start = None
    assert breakdown(905 * mib, sampler, state, rest) is None


def test_heap_counters_move_with_a_large_allocation() -> None:
    before = heap_stats()
    if before is None:
        pytest.skip("not glibc")
    t = torch.ones(64 << 20 >> 2)  # 64 MiB
    during = heap_stats()
    assert during is not None and during.in_use - before.in_use >= 64 << 20
    del t


def _memory(tmp_path: Path, name: str, *sets: str) -> dict:
    out = tmp_path / name
    args = [sys.executable, "-m", "cotune", "memory", "examples/bbc-news-centralized.toml",
            "--steps", "3", "--out", str(out), "--set", "train.threads=1", *sum((["--set", s] for s in sets), [])]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device peak RSS of a training step" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert "Device memory at the peak step" in (out / "report.html").read_text()
    return summary


@pytest.mark.slow
def test_cotune_memory_parts_add_up_to_the_peak_on_minilm(tmp_path: Path) -> None:
    """minilm full fine-tuning, batch 16 x 128 (BBC News): the parts sum to the measured
    peak within 10%; with `none` the peak falls while the saved activations are alive;
    norm keep 0.1 lowers the peak."""
    none = _memory(tmp_path, "none")
    b = none["memory_breakdown"]
    assert abs(b["parts_total"] - b["peak_rss"]) <= 0.10 * b["peak_rss"]
    assert b["peak_rss"] == none["device_peak_bytes"]
    # full fine-tuning: every parameter trains (fp32), plus two int64 buffers of 512
    # (BERT's position ids and token type ids)
    assert b["parameters"] == 4 * none["trainable_params"]["device"] + 2 * 512 * 8
    assert b["saved_activations"] >= 0.9 * none["saved_activation_bytes"]
    norm = _memory(tmp_path, "norm", 'memory.backward="norm"', "memory.keep=0.1")
    n = norm["memory_breakdown"]
    assert abs(n["parts_total"] - n["peak_rss"]) <= 0.10 * n["peak_rss"]
    assert n["peak_rss"] < b["peak_rss"] - 200 * (1 << 20)


# ----------------------------------------------------------------------------- the cap


def _tiny_config(tmp_path: Path) -> Path:
    from helpers import write_sst2

    data = write_sst2(tmp_path, n_train=64, n_dev=16)
    path = tmp_path / "tiny.toml"
    path.write_text(
        'name = "cap-test"\nmethod = "centralized"\n\n'
        f'[task]\nname = "glue/sst2"\ndata_dir = {json.dumps(str(data))}\n\n'
        '[model]\nname = "tiny-bert"\n\n'
        "[train]\nsteps = 3\nbatch_size = 8\nmax_seq_len = 24\nthreads = 1\n"
    )
    return path


def test_parse_memory_size() -> None:
    from cotune.cli.main import parse_memory_size
    from cotune.errors import UserError

    assert parse_memory_size("1.5GiB") == 1536.0
    assert parse_memory_size("800MiB") == parse_memory_size("800M") == 800.0
    assert parse_memory_size("2GB") == pytest.approx(2e9 / 2**20)
    assert parse_memory_size(str(3 << 20)) == 3.0
    for bad in ("", "lots", "-1GiB", "1.5 parsecs", "0"):
        with pytest.raises(UserError, match="positive size such as 1.5GiB"):
            parse_memory_size(bad)


@pytest.mark.slow
def test_max_memory_below_the_need_fails_before_training_with_status_2(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cotune", "run", str(config), "--out", str(out),
            "--max-memory", "64MiB"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert "above its cap of 64 MiB" in err and "nothing was trained" in err
    assert "Traceback" not in err
    need = float(err.split("this run needs ")[1].split(" MiB")[0].replace(",", ""))
    assert need > 64  # the measured need is a real RSS: the interpreter alone exceeds it
    # no option fits 64 MiB either, and the message says which were measured
    assert "No single option measured fits" in err and "memory.checkpoint = true (" in err
    assert not (out / "train.jsonl").exists() and not (out / "summary.json").exists()
    # a cap above the need: measured, accepted, trained
    done = subprocess.run([*args[:-1], f"{need + 400:.0f}MiB"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "within its cap" in done.stdout and (out / "summary.json").is_file()


def test_cap_checked_after_each_step_stops_a_run_that_grows_past_it() -> None:
    from cotune.memory.cap import MemoryCapExceeded, check_memory_cap, set_memory_cap

    set_memory_cap(100 << 20)
    try:
        check_memory_cap(100 << 20)  # at the cap: fine
        with pytest.raises(MemoryCapExceeded, match="above its cap of 100 MiB"):
            check_memory_cap((100 << 20) + 1)
    finally:
        set_memory_cap(None)
    check_memory_cap(1 << 40)  # no cap: nothing to check


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/pagemap is Linux's")
def test_a_mapped_weight_counts_only_its_resident_pages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Weights mapped from a file (as transformers loads safetensors) count in the
    breakdown's parameters only where they were read, as they count in RSS."""
    n = 4 * 1024 * 1024  # 16 MiB of fp32
    path = tmp_path / "weights.bin"
    np.zeros(n, dtype=np.float32).tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    module = nn.Module()
    module.weight = nn.Parameter(mapped, requires_grad=False)
    module.bias = nn.Parameter(torch.zeros(1000))  # on the heap: counted in full
    mib = 1024 * 1024

    untouched = model_state_bytes([module], None)
    assert untouched["parameters_mapped"] < 1 * mib
    assert untouched["parameters"] == untouched["parameters_mapped"] + 4000

    assert float(mapped[: n // 2].sum()) == 0.0  # read the first half
    half = model_state_bytes([module], None)
    assert 8 * mib <= half["parameters_mapped"] <= 9 * mib
    assert half["parameters"] == half["parameters_mapped"] + 4000
    assert resident_bytes([mapped, mapped[: n // 4]]) == half["parameters_mapped"]  # once


def test_the_cap_offers_slicing_the_batch_of_checkpointed_layers() -> None:
    from cotune.config import build_config
    from cotune.runtime.memory_cap import alternatives

    on = build_config({"memory": {"checkpoint": True}, "train": {"batch_size": 16}})
    options = alternatives(on)
    assert options["memory.checkpoint_chunks = 4"] == ["memory.checkpoint_chunks=4"]
    for sets in options.values():  # every alternative is a valid config
        build_config({"memory": {"checkpoint": True}, "train": {"batch_size": 16}}, sets)
    off = alternatives(build_config({"train": {"batch_size": 16}}))
    assert "memory.checkpoint_chunks = 4" not in off  # chunks need checkpointing on
    done = build_config({"memory": {"checkpoint": True, "checkpoint_chunks": 4}})
    assert "memory.checkpoint_chunks = 4" not in alternatives(done)
