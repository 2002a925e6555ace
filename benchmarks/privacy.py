"""What the cut of a split run leaks, measured: token recovery by an honest-but-curious
cloud (minilm on SST-2) over cuts x codecs x `[privacy]` noise, before and after
fine-tuning, and what the cloud learns about the labels.

The attacker (`cotune.attack`): the cloud builds the same pre-trained model and cut
from the same seed, pushes public text (BBC News sentences, never SST-2) through its
own copy of the device segment, the codec and the noise (`[privacy]` is public), and
trains an inverter (linear over the public vocabulary, unless stated) mapping each row
back to its token. It is scored on the rows the device sends for SST-2 training
sentences (the device's data): exact-token recovery at every real position (special
tokens excluded), and on the 100 most label-informative tokens (chosen by the measurer
from the whole SST-2 train set, 67,349 labelled phrases: largest |log-odds shift of a
label given the token's presence|, add-one smoothed, among whole words of 3+ letters
(no '##' pieces) present in at least 100 phrases: frequent sentiment words).

Floors: an untrained inverter (random init, same vocabulary) and the public data's most
frequent token everywhere. Upper bound: the identity codec at cut 1 without noise (the
rows closest to the embeddings; every other cell sends less or noisier information).

Noise: the std `[privacy]` gives a user's run (`cotune.privacy.cut_noise_for`: Opacus
RDP accountant) for epsilon 8 and 1 at delta 1e-5, clip 1.0, max_seq_len 64, batch 32,
2,000 steps over SST-2's 67,349 training phrases; applied with `CutNoise` (clip each row,
add the noise) before the codec, on the attacker's public rows and the device's rows.

Before/after fine-tuning: a short split run (cut 1, 300 steps of 32, lr 1e-4, full
fine-tuning) per codec listed in `FINETUNE`; the inverter (trained through the initial
weights: the cloud never sees the device's) is scored on rows from the trained segment.

Labels: `split.labels = "cloud"` sends them (100%); a U-shaped run (`"device"`, cut 1,
100 steps of 32) records the gradient the cloud receives for every training example
and `cotune.attack.label_leak.gradient_label_attack` infers the labels from it.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/privacy.py          # resumable
    .venv/bin/python benchmarks/privacy.py --table-only                    # the .md only

Writes benchmarks/results/privacy.json (every finished cell; a rerun skips them) and
privacy.md; the fine-tuning runs stay under benchmarks/results/privacy/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
RUNS = OUT / "privacy"
DATA = Path(os.environ.get("COTUNE_SST2", "/work/shared/data/glue/SST-2"))

SEED = 0
MAX_LEN = 64
CUTS = (1, 2, 3, 4)
CODECS = {"identity": {"codec": "identity"}, "int8": {"codec": "int8"},
          "sft8": {"codec": "sft", "rank": 8}}  # fmt: skip
NOISE = {"none": None, "eps8": 8.0, "eps1": 1.0}
PRIVACY = {"delta": 1e-5, "clip": 1.0, "batch_size": 32, "steps": 2000}
PUBLIC_SENTENCES = 2000
DEVICE_EXAMPLES = 500
INVERTER_STEPS = 400
MLP_HIDDEN = 1024
INFORMATIVE_MIN = 100
FINETUNE = ("identity",)
FT_TRAIN = {"steps": 300, "batch_size": 32, "lr": 1e-4}
LABEL_TRAIN = {"steps": 100, "batch_size": 32, "lr": 1e-4}


def raw_config(codec: str, cut: int, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"privacy-cut{cut}-{codec}", "method": "split", "seed": SEED,
        "task": {"name": "glue/sst2", "data_dir": str(DATA)},
        "model": {"name": "minilm"}, "split": {"cut": cut, "labels": "cloud"},
        "link": dict(CODECS[codec]),
        "train": {"steps": 10, "batch_size": 32, "max_seq_len": MAX_LEN, "threads": 1},
        "runtime": {"transport": "inprocess"},
    }  # fmt: skip
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


class Bench:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("cells", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    def done(self, key: str) -> bool:
        return key in self.data["cells"]

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data["cells"][key] = value
        self.save()
        short = {k: v for k, v in value.items() if not isinstance(v, list)}
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {short}", flush=True)


def setup(bench: Bench) -> dict[str, Any]:
    from cotune.attack.cut_attack import sentences_of
    from cotune.attack.inversion import informative_tokens
    from cotune.config import TaskConfig, build_config
    from cotune.data import load_task
    from cotune.models import load_tokenizer

    cfg = build_config(raw_config("identity", 1))
    task = load_task(cfg.task, cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    specials = set(tokenizer.all_special_ids)
    bbc = load_task(TaskConfig(name="bbc-news"), cfg.seed)
    public = sentences_of([e.text_a for e in bbc.train], PUBLIC_SENTENCES, cfg.seed)
    chosen = random.Random(cfg.seed).sample(range(len(task.train)), DEVICE_EXAMPLES)
    device = [task.train[i].text_a for i in chosen]
    enc = tokenizer([e.text_a for e in task.train], truncation=True, max_length=MAX_LEN)
    ids = [[t for t in x if t not in specials] for x in enc["input_ids"]]
    labels = [int(e.label) for e in task.train]
    whole = {i for i, w in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
             if w.isalpha() and len(w) >= 3}  # fmt: skip
    ids = [[t for t in x if t in whole] for x in ids]
    top = informative_tokens(ids, labels, top=100, min_count=INFORMATIVE_MIN)
    bench.data["setup"] = {
        "model": "minilm (all-MiniLM-L6-v2)", "task": "glue/sst2", "seed": SEED,
        "max_seq_len": MAX_LEN, "public": f"BBC News train sentences (5+ words), {len(public)}",
        "device_examples": f"{len(device)} SST-2 train phrases (seeded sample)",
        "sst2_train": len(task.train), "inverter_steps": INVERTER_STEPS,
        "inverter_batch": 512, "mlp_hidden": MLP_HIDDEN, "privacy": PRIVACY,
        "informative_tokens": tokenizer.convert_ids_to_tokens(top),
        "informative_rule": "top 100 by |log-odds(label | token present) - prior log-odds|, "
        f"add-one smoothed, among whole-word alphabetic tokens (3+ letters) in >= "
        f"{INFORMATIVE_MIN} of the {len(task.train)} SST-2 train phrases",
    }  # fmt: skip
    bench.save()
    return {"cfg": cfg, "tokenizer": tokenizer, "public": public, "device": device,
            "informative": top, "specials": sorted(specials), "n_train": len(task.train)}  # fmt: skip


def noise_pair(codec: str, cut: int, epsilon: float | None, n_train: int) -> Any:
    """(attacker noise, device noise, budget summary) through cotune.privacy's own
    path: `cut_noise_for` on a config with this `[privacy]`, two independent seeds."""
    from cotune.config import build_config
    from cotune.privacy import CutNoise, cut_noise_for

    if epsilon is None:
        return None, None, None
    cfg = build_config(
        raw_config(codec, cut, privacy={"epsilon": epsilon, "delta": PRIVACY["delta"],
                                        "clip": PRIVACY["clip"]},
                   train={"batch_size": PRIVACY["batch_size"], "steps": PRIVACY["steps"]})
    )  # fmt: skip
    planned = cut_noise_for(cfg, n_examples=n_train, steps=PRIVACY["steps"])
    assert planned is not None
    a, d = CutNoise(planned.budget, seed=1), CutNoise(planned.budget, seed=2)
    return (lambda r: a(r, True)), (lambda r: d(r, True)), planned.budget.summary()


def rows_for(s: dict[str, Any], codec: str, cut: int, state: Any = None) -> Any:
    from cotune.attack.cut_attack import device_segment
    from cotune.attack.inversion import segment_rows
    from cotune.config import build_config

    cfg = build_config(raw_config(codec, cut))
    kw = {"max_length": MAX_LEN, "skip_ids": s["specials"]}
    public = segment_rows(device_segment(cfg, 2, "classification"), s["tokenizer"], s["public"],
                          **kw)  # fmt: skip
    sent = segment_rows(device_segment(cfg, 2, "classification", state), s["tokenizer"],
                        s["device"], **kw)  # fmt: skip
    return public, sent


def cell(s: dict[str, Any], raw_public: Any, raw_sent: Any, codec: str, cut: int,
         epsilon: float | None, hidden: int = 0) -> dict[str, Any]:  # fmt: skip
    """One cell: the rows through the link (noise, codec), inverter trained, scored."""
    from cotune.attack.cut_attack import score
    from cotune.attack.inversion import through_link
    from cotune.config import build_config
    from cotune.link.codecs import make_codec

    t0 = time.time()
    link = make_codec(build_config(raw_config(codec, cut)).link)
    a_noise, d_noise, budget = noise_pair(codec, cut, epsilon, s["n_train"])
    public = through_link(raw_public, link, noise=a_noise)
    sent = through_link(raw_sent, link, noise=d_noise)
    out: dict[str, Any] = {"cut": cut, "codec": codec, "epsilon": epsilon,
                           "width": int(sent.rows.shape[1]),
                           "noise_std": budget["noise_std"] if budget else 0.0,
                           "noise_multiplier": budget["noise_multiplier"] if budget else None,
                           "public_rows": int(public.rows.shape[0]),
                           "device_rows": int(sent.rows.shape[0])}  # fmt: skip
    out.update(score(public, sent, steps=INVERTER_STEPS, hidden=hidden, seed=SEED,
                     informative=s["informative"]))  # fmt: skip
    out["seconds"] = round(time.time() - t0, 1)
    return out


def finetune(codec: str) -> Path:
    """A short split run at cut 1 with `codec` (reused when finished)."""
    from cotune.config import build_config
    from cotune.methods import resolve
    from cotune.runtime.experiment import run_experiment

    run = RUNS / f"finetune-cut1-{codec}"
    if (run / "device_trainable.safetensors").is_file() and (run / "summary.json").is_file():
        return run
    cfg = build_config(raw_config(codec, 1, train={**FT_TRAIN, "eval_every": FT_TRAIN["steps"]}))
    return run_experiment(resolve(cfg), run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT / "privacy.json")
    ap.add_argument("--table-only", action="store_true", help="rewrite the .md from the JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench(args.out)
    if not args.table_only:
        run_all(bench)
    args.out.with_suffix(".md").write_text(table(bench.data))
    print(f"written: {args.out} and {args.out.with_suffix('.md')}")
    return 0


def sweep(bench: Bench, s: dict[str, Any], cuts: tuple[int, ...], noise: tuple[str, ...]) -> None:
    """The codec x `noise` cells of `cuts` (and the MLP inverter on cut 1's sft8); the
    segment's rows are computed once per cut and kind (identity and int8 share one)."""
    cache: dict[tuple[int, bool], Any] = s.setdefault("rows", {})
    for cut in cuts:
        for codec in CODECS:
            keys = [(f"sweep/cut{cut}/{codec}/{n}", NOISE[n]) for n in noise]
            mlp = f"mlp/cut{cut}/{codec}/none"
            want_mlp = cut == 1 and codec == "sft8" and "none" in noise
            if all(bench.done(k) for k, _ in keys) and (bench.done(mlp) or not want_mlp):
                continue
            kind = (cut, codec == "sft8")
            if kind not in cache:
                cache.clear()  # one cut's rows in memory at a time
                cache[kind] = rows_for(s, codec, cut)
            raw_public, raw_sent = cache[kind]
            for key, eps in keys:
                if not bench.done(key):
                    bench.put(key, cell(s, raw_public, raw_sent, codec, cut, eps))
            if want_mlp and not bench.done(mlp):
                bench.put(mlp, cell(s, raw_public, raw_sent, codec, cut, None, MLP_HIDDEN))


def run_all(bench: Bench) -> None:
    from safetensors.torch import load_file

    from cotune.config import build_config
    from cotune.runtime.curious_cloud import label_leak

    started = time.time()
    s = setup(bench)
    # cut 1 first, then the other cells, then cuts 2-4 without noise, then with: an
    # interrupted run has the upper bound, fine-tuning and labels before the deeper cuts
    sweep(bench, s, (1,), tuple(NOISE))
    for codec in FINETUNE:
        key = f"finetuned/cut1/{codec}/none"
        if bench.done(key):
            continue
        t0 = time.time()
        run = finetune(codec)
        ft_seconds = time.time() - t0
        summary = json.loads((run / "summary.json").read_text())
        state = load_file(str(run / "device_trainable.safetensors"))
        raw_public, raw_sent = rows_for(s, codec, 1, state)
        out = cell(s, raw_public, raw_sent, codec, 1, None)
        out.update({"run": str(run.relative_to(ROOT)), "finetune": FT_TRAIN,
                    "finetune_seconds": round(ft_seconds, 1),
                    "run_accuracy": summary.get("metrics", {}).get("accuracy")})  # fmt: skip
        bench.put(key, out)
    for labels in ("cloud", "device"):
        key = f"labels/{labels}"
        if bench.done(key):
            continue
        t0 = time.time()
        train = {**LABEL_TRAIN, "eval_every": LABEL_TRAIN["steps"]}
        cfg = build_config(raw_config("identity", 1, split={"labels": labels}, train=train))
        out = label_leak(cfg, RUNS / f"labels-{labels}", seed=SEED)
        out.update({"cut": 1, "codec": "identity", "train": LABEL_TRAIN,
                    "seconds": round(time.time() - t0, 1)})  # fmt: skip
        bench.put(key, out)
    sweep(bench, s, CUTS[1:], ("none",))
    sweep(bench, s, CUTS[1:], tuple(n for n in NOISE if n != "none"))
    bench.data["last_run_seconds"] = round(time.time() - started, 1)
    bench.save()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(data: dict[str, Any]) -> str:
    cells = data.get("cells", {})
    st = data.get("setup", {})
    lines = [
        "# What the cut leaks: token recovery on SST-2 (minilm)",
        "",
        f"Inverter: linear, {st.get('inverter_steps')} steps of {st.get('inverter_batch')} "
        f"rows, trained on {st.get('public')} through the initial device segment; scored "
        f"on {st.get('device_examples')}; seed {st.get('seed')}, max_seq_len "
        f"{st.get('max_seq_len')}. Cells: exact-token recovery / on the 100 most "
        "label-informative tokens.",
        "",
        "| cut | codec | no noise | epsilon 8 | epsilon 1 |",
        "|---|---|---|---|---|",
    ]
    for cut in CUTS:
        for codec in CODECS:
            row = [str(cut), codec]
            for n in NOISE:
                c = cells.get(f"sweep/cut{cut}/{codec}/{n}")
                row.append("not run" if c is None else
                           f"{_pct(c['token_recovery'])} / {_pct(c.get('informative_recovery'))}")  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    ref = cells.get("sweep/cut1/identity/none")
    if ref:
        lines.append(
            f"Floors (cut 1, identity): untrained inverter {_pct(ref['floor_untrained'])}, "
            f"most frequent public token {_pct(ref['floor_majority'])} "
            f"(informative tokens: {_pct(ref.get('informative_floor_majority'))}). "
            f"Upper bound of this attacker: cut 1 identity, no noise, "
            f"{_pct(ref['token_recovery'])} (public fit {_pct(ref['public_fit'])})."
        )
    for eps in ("eps8", "eps1"):
        c = cells.get(f"sweep/cut1/identity/{eps}")
        if c:
            lines.append(f"- {eps}: noise std {c['noise_std']:.3g} per coordinate "
                         f"(noise multiplier {c['noise_multiplier']:.3g}).")  # fmt: skip
    extra = [("mlp/cut1/sft8/none", "cut 1, sft8, MLP inverter (hidden "
              f"{st.get('mlp_hidden')})")]  # fmt: skip
    extra += [(f"finetuned/cut1/{c}/none", f"cut 1, {c}, after fine-tuning") for c in FINETUNE]
    lines += ["", "| other cells | recovery | informative | before |", "|---|---|---|---|"]
    for key, label in extra:
        c = cells.get(key)
        codec = key.split("/")[2]
        before = cells.get(f"sweep/cut1/{codec}/none")
        if c:
            lines.append(f"| {label} | {_pct(c['token_recovery'])} | "
                         f"{_pct(c.get('informative_recovery'))} | "
                         f"{_pct(before['token_recovery']) if before else '-'} |")  # fmt: skip
    lines += ["", "| labels | cloud's label recovery | majority floor |", "|---|---|---|"]
    for labels in ("cloud", "device"):
        c = cells.get(f"labels/{labels}")
        if c:
            lines.append(f"| split.labels = {labels!r} | {_pct(c['label_recovery'])} | "
                         f"{_pct(c.get('floor_majority'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
