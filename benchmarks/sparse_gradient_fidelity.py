"""How close the sparse-backward gradients are to autograd's, per layer: why BackRazor at
keep 0.3 costs 6 points on DINOv2 / Fashion-MNIST and nothing on MiniLM / SST-2.

For each model (its example config, LoRA dropout off), on one training batch of its own
task as the config's adapter builds it:

1. `warm_steps` AdamW steps of plain LoRA on that batch (so LoRA's B matrices are not zero
   and both A and B have gradients);
2. the exact gradient of every trainable tensor (eval mode: no dropout);
3. the same with `memory.backward` set (`apply_memory_option` on a copy), for each
   setting: every op at keep 0.3 and 0.1, and each op alone at keep 0.3
   (`memory.ops`);
4. per transformer layer, the mean over its LoRA tensors of the cosine between the two
   gradients and of the relative error |g' - g| / |g|.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/sparse_gradient_fidelity.py

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/sparse_gradient_fidelity.py --mode norm

Writes benchmarks/results/sparse_gradient_fidelity-MODE.{json,md}. A few minutes on one core.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from comparison import ROOT, training_batches, write  # noqa: E402
from device_memory import LORA, MINILM_BATCHES  # noqa: E402
from torch import nn  # noqa: E402

from cotune.config import MemoryConfig  # noqa: E402
from cotune.config.schema import MEMORY_OPS  # noqa: E402
from cotune.memory import apply_memory_option  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
MODELS = {  # name: (example config, overrides)
    "dinov2-small (Fashion-MNIST, 56 px)": ("examples/fashion-mnist-lora.toml", []),
    "minilm (SST-2, up to 64 tokens)": ("examples/sst2-centralized.toml", []),
    "minilm (BBC News, 16 x 128 real tokens)": (
        "examples/bbc-news-centralized.toml",
        [*MINILM_BATCHES, *LORA],
    ),
}
SETTINGS: list[tuple[str, float, list[str]]] = [
    ("all ops, keep 0.5", 0.5, list(MEMORY_OPS)),
    ("all ops, keep 0.3", 0.3, list(MEMORY_OPS)),
    ("all ops, keep 0.1", 0.1, list(MEMORY_OPS)),
    *[(f"{op} only, keep 0.3", 0.3, [op]) for op in MEMORY_OPS],
]


def _grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _layer(name: str) -> str:
    """'3' for a tensor of transformer layer 3, 'head' otherwise."""
    return name.split("layer.")[1].split(".")[0] if "layer." in name else "head"


def measure(config: str, sets: list[str], mode: str, warm_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg, model, loader = training_batches(ROOT / config, [*sets, "model.lora.dropout=0.0"], 4)
    batch = next(iter(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr or 2e-3)
    model.train()
    for _ in range(warm_steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    exact = _grads(model, batch)
    rows: dict[str, Any] = {}
    for label, keep, ops in SETTINGS:
        memory = MemoryConfig(backward=mode, keep=keep, ops=ops)
        approx = _grads(apply_memory_option(copy.deepcopy(model), memory, seed=0), batch)
        per_layer: dict[str, list[tuple[float, float]]] = {}
        for name, g in exact.items():
            if float(g.norm()) == 0.0:  # LoRA A before B moves: nothing to compare
                continue
            a = approx[name]
            cos = float(F.cosine_similarity(g.flatten(), a.flatten(), dim=0))
            rel = float((a - g).norm() / g.norm())
            per_layer.setdefault(_layer(name), []).append((cos, rel))
        layers = {
            k: {
                "cosine": statistics.fmean(c for c, _ in v),
                "relative_error": statistics.fmean(r for _, r in v),
            }
            for k, v in per_layer.items()
        }
        encoder = [v["cosine"] for k, v in layers.items() if k != "head"]
        rows[label] = {"keep": keep, "ops": ops, "layers": layers,
                       "mean_layer_cosine": statistics.fmean(encoder),
                       "min_layer_cosine": min(encoder)}  # fmt: skip
        print(f"  {label}: mean layer cosine {rows[label]['mean_layer_cosine']:.3f}", flush=True)
    shape = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    return {"config": config, "sets": sets, "batch": shape, "settings": rows}


def render(data: dict[str, Any]) -> str:
    lines = [
        f'# Sparse-backward gradient fidelity (`memory.backward = "{data["mode"]}"`)',
        "",
        f"One batch per model, after {data['warm_steps']} warm-up steps of plain LoRA; "
        "cosine between the sparse and the exact gradient of each LoRA tensor, mean over a "
        "layer's tensors, then the mean and the lowest over the layers. `keep` is a share "
        "of the batch's padded length: SST-2's short phrases padded to the batch's longest "
        "keep every real token at keep 0.3 (so 1.00), the BBC News texts fill all 128.",
        "",
        "| setting | " + " | ".join(data["models"]) + " |",
        "|---|" + "---|" * len(data["models"]),
    ]
    for label, _, _ in SETTINGS:
        cells = []
        for m in data["models"].values():
            r = m["settings"][label]
            cells.append(f"{r['mean_layer_cosine']:.2f} (lowest {r['min_layer_cosine']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", default="backrazor", choices=["backrazor", "norm", "random"])
    p.add_argument("--warm-steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default results/sparse_gradient_fidelity-MODE.json)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    models = {}
    for name, (config, sets) in MODELS.items():
        print(name, flush=True)
        models[name] = measure(config, sets, args.mode, args.warm_steps)
    out = args.out or OUT / f"sparse_gradient_fidelity-{args.mode}.json"
    write({"mode": args.mode, "warm_steps": args.warm_steps, "models": models}, out, render)


if __name__ == "__main__":
    main()
