"""fedpft end to end on the federated apps (inline engine, tiny-bert, synthetic SST-2):
what travels to the devices, when, and what the cloud does with their statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from helpers import tiny_config, write_sst2

from cotune.methods.federated.client import client_adapter
from cotune.methods.fedpft.cloud import META_KEY, PROXY_KEY
from cotune.methods.fedpft.device import proxy_local_train
from cotune.models.proxy import encoder_layers, top_neurons
from cotune.report.run_folder import read_jsonl
from cotune.runtime.federated.apps import build_client_app
from cotune.runtime.federated.engine import run_federated
from cotune.runtime.federated.keys import ARRAYS_KEY


class Tap:
    """A client mod keeping every train message's arrays (what a device receives)."""

    def __init__(self) -> None:
        self.received: list[dict[str, dict[str, np.ndarray]]] = []

    def __call__(self, msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train":
            self.received.append(
                {
                    name: {k: v.numpy() for k, v in rec.items()}
                    for name, rec in msg.content.array_records.items()
                }  # fmt: skip
            )
        return call_next(msg, ctx)


@pytest.mark.slow
def test_fedpft_round_trip_sends_only_the_proxy_and_realigns(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=96)
    cfg = tiny_config(
        data,
        method="fedpft",
        federated={"clients": 3, "rounds": 3, "fraction": 1.0},
        proxy={"ffn_keep": 32, "align_steps": 3, "realign_steps": 2, "align_every": 1},
    )
    assert cfg.model.lora is not None and "key" in cfg.model.lora.target_modules
    tap = Tap()
    run_federated(cfg, tmp_path / "run", engine="inline",
                  client_app=build_client_app([tap]))  # fmt: skip
    rounds = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients_ok"] == 3 and "accuracy" in r for r in rounds)  # FM scored each round
    assert rounds[0]["proxy_non_embedding_params"] < rounds[0]["fm_non_embedding_params"]
    # neuron-level alignment after rounds 1 and 2 (not after the last), from device stats
    assert [r.get("proxy_version") for r in rounds] == [2.0, 3.0, None]
    assert rounds[0]["realign_neurons"] == 2 * 16  # half of 32 neurons in layers 1 and 2

    # what the devices received: the full proxy once, then only re-aligned FFN tensors
    assert len(tap.received) == 9
    first, later = tap.received[:3], tap.received[3:]
    full = set(first[0][PROXY_KEY])
    assert all(set(m[PROXY_KEY]) == full for m in first)
    for m in later:
        sent = set(m[PROXY_KEY])
        assert sent and sent < full
        assert all(".layer.1." in n or ".layer.2." in n for n in sent)
        assert all("intermediate.dense" in n or "output.dense.weight" in n for n in sent)
    assert rounds[1]["round_bytes_down"] < rounds[0]["round_bytes_down"] / 5
    assert all(int(m[META_KEY]["stats"][0]) == (i < 6) for i, m in enumerate(tap.received))

    # the full model never leaves the cloud: no message holds a full FFN of a compressed
    # layer, nor any input row / output column of a neuron the proxy dropped
    fm, _ = client_adapter(cfg).build_model()
    arrays = [a for m in tap.received for rec in m.values() for a in rec.values()]
    for i in (1, 2):
        layer = encoder_layers(fm)[i]
        w_in = layer.intermediate.dense.weight.detach().numpy()
        w_out = layer.output.dense.weight.detach().numpy()
        kept = set(top_neurons(layer, 32).tolist())
        dropped = [k for k in range(w_in.shape[0]) if k not in kept]
        secret = {w_in[k].tobytes() for k in dropped} | {w_out[:, k].tobytes() for k in dropped}
        for a in arrays:
            # (kept layers 0 and 3 have FFNs of the same shape: compare values)
            assert not (a.shape == w_in.shape and np.array_equal(a, w_in))
            assert not (a.shape == w_out.shape and np.array_equal(a, w_out))
            if a.ndim == 2:
                vectors = [*np.ascontiguousarray(a), *np.ascontiguousarray(a.T)]
                assert not any(v.tobytes() in secret for v in vectors)
    sent_params = sum(a.size for rec in first[0].values() for a in rec.values())
    assert sent_params < sum(p.numel() for p in fm.parameters())
    assert set(first[0][ARRAYS_KEY]) == {n for n, p in fm.named_parameters() if p.requires_grad}


def test_device_refuses_to_train_on_a_proxy_it_does_not_hold(tmp_path: Path) -> None:
    data = write_sst2(tmp_path, n_train=32)
    cfg = tiny_config(data, method="fedpft", federated={"clients": 2}, seed=1234,
                      proxy={"ffn_keep": 32})  # fmt: skip
    meta = {"version": np.array([7]), "stats": np.array([0])}
    with pytest.raises(RuntimeError, match="holds proxy version 0"):
        proxy_local_train(cfg, 0, {}, 1, {META_KEY: meta})
