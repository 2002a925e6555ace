"""`fedpft`: federated proxy fine-tuning (METHODS.md section 4, `[proxy]`).

The cloud keeps the full model (FM) and sends devices a proxy built from it
(`cotune.models.proxy`: top-m FFN neurons by saliency, or whole layers dropped with
`proxy.kind = "layer_drop"`), aligned layer by layer on public text before federated
training and neuron by neuron during it; devices train LoRA on the proxy's attention
projections plus the head, and the aggregated adapter is plugged into the FM, which
is evaluated every round. Runs on the federated Flower apps
(`cotune.runtime.federated`) with `cotune.methods.federated.pft` as server hook and
client trainer.
"""

from __future__ import annotations

from pathlib import Path

from cotune.config import Config
from cotune.methods.result import MethodResult, Recorder


def run(
    cfg: Config, recorder: Recorder, run_dir: str | Path | None = None, resume: bool = False
) -> MethodResult:
    from cotune.runtime.federated import run_federated

    return run_federated(cfg, recorder, run_dir, resume=resume)
