"""Plain helpers shared by the test modules (fixtures live in conftest.py).

Split and link tests: tiny split configs, batches, a device + cloud pair.
Federated tests: a synthetic SST-2 folder and a tiny fedlora config.
splitfed tests: a synthetic E2E folder and a tiny splitfed config.
Own-data tests: tiny CSV files of distinct rows per node and their fingerprints.
Anything that waits on another thread or process: `eventually`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cotune.config import Config, build_config
from cotune.link.accounting import Tap
from cotune.link.auth import TokenBook
from cotune.link.service import CloudEndpoint
from cotune.link.transport import InProcessTransport, Transport
from cotune.methods import resolve
from cotune.methods.split import SplitCloud, SplitDevice, build_split
from cotune.models.rng import RngStream

# ----------------------------------------------------------------------------- waiting


def eventually(cond: Callable[[], object], timeout: float = 60.0, every: float = 0.02) -> bool:
    """Wait until `cond()` holds, for at most `timeout` seconds; returns its last value.

    For state that another thread or process updates after the call the test made has
    returned (e.g. the cloud's optimiser step, which runs after its answer is sent). The
    bound is generous: it only decides how long a broken run takes to fail.
    """
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(every)
    return bool(cond())


# ------------------------------------------------------------------------ split / link

TOKEN = "secret-token-0"


def tiny_cfg(family: str = "bert", **sections: dict) -> Config:
    data: dict = {
        "method": "split",
        "seed": 0,
        "model": {"name": f"tiny-{family}"},
        "split": {"cut": 2, "labels": "cloud"},
        "link": {"codec": "identity"},
        "train": {"optimizer": "sgd", "lr": 0.1, "max_grad_norm": None, "max_seq_len": 32},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return build_config(data)


def span_batch_for(
    family: str, b: int = 3, length: int = 7, seed: int = 1
) -> dict[str, torch.Tensor]:
    """`batch_for`'s text batch (right padding of different lengths) with extractive QA
    labels: a (start, end) pair of real token positions per row."""
    batch = batch_for(family, b, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for real in batch["attention_mask"].sum(dim=1).tolist():
        start = int(torch.randint(0, real, (1,), generator=g))
        rows.append([start, int(torch.randint(start, real, (1,), generator=g))])
    return {**batch, "labels": torch.tensor(rows)}


def batch_for(family: str, b: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (b,), generator=g)
    if family == "vit":
        return {"pixel_values": torch.randn(b, 1, 28, 28, generator=g), "labels": labels}
    if family == "dinov2":  # 3 x 3 patches of 14: the 2 x 2 position grid is interpolated
        return {"pixel_values": torch.randn(b, 3, 42, 42, generator=g), "labels": labels}
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for row in range(1, b):  # right padding of different lengths
        mask[row, length - 2 * row :] = 0
    ids[mask == 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }


def make_device(
    cfg: Config,
    transport: Transport,
    rng: RngStream | None = None,
    num_labels: int = 3,
    problem: str = "classification",
) -> SplitDevice:
    split, codec = build_split(cfg, num_labels, problem)
    return SplitDevice(
        cfg, split, codec, transport, num_labels=num_labels, problem=problem, rng=rng
    )


def inprocess_pair(
    cfg: Config,
    *,
    rng: RngStream | None = None,
    tap: Tap | None = None,
    total_steps: int = 10,
    problem: str = "classification",
) -> tuple[SplitDevice, SplitCloud, CloudEndpoint]:
    """A connected device and cloud; `problem="span"` cuts a span extractor (QA)."""
    cloud = SplitCloud(cfg, rng=rng)
    endpoint = CloudEndpoint(cloud, TokenBook({0: TOKEN}))
    num_labels = 2 if problem == "span" else 3
    transport = InProcessTransport(endpoint, 0, TOKEN, tap=tap)
    device = make_device(cfg, transport, rng=rng, num_labels=num_labels, problem=problem)
    device.connect(total_steps)
    return device, cloud, endpoint


# --------------------------------------------------------------------------- federated

POSITIVE = ["good", "great", "charming", "witty", "lovely", "brilliant", "moving", "fun"]
NEGATIVE = ["bad", "dull", "boring", "awful", "lifeless", "clumsy", "tedious", "weak"]
FILLER = ["the", "movie", "film", "plot", "is", "a", "very", "and", "story", "acting"]


def write_sst2(root: Path, n_train: int = 160, n_dev: int = 48, seed: int = 0) -> Path:
    """An SST-2-layout folder whose label is carried by sentiment words."""
    rng = random.Random(seed)
    d = root / "SST-2"
    d.mkdir(parents=True, exist_ok=True)

    def rows(n: int) -> list[str]:
        out = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label else NEGATIVE, 2)
            rng.shuffle(words)
            out.append(f"{' '.join(words)} .\t{label}")
        return out

    (d / "train.tsv").write_text("\n".join(rows(n_train)) + "\n")
    (d / "dev.tsv").write_text("\n".join(rows(n_dev)) + "\n")
    return d


def tiny_config(data_dir: Path, **sections: dict) -> Config:
    """A fedlora config on tiny-bert that trains in about a second per client round."""
    data: dict = {
        "name": "test-fed",
        "method": "fedlora",
        "seed": 0,
        "task": {"name": "glue/sst2", "data_dir": str(data_dir), "max_eval_examples": 32},
        "model": {"name": "tiny-bert"},
        "train": {"batch_size": 8, "max_seq_len": 24, "threads": 1},
        "federated": {"clients": 2, "rounds": 2, "local_steps": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return resolve(build_config(data))


# ------------------------------------------------------------ a device's own data (csv)

GOOD = ["good", "great", "lovely", "witty", "fun"]
BAD = ["bad", "dull", "awful", "weak", "boring"]


def write_rows(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def node_rows(node: int, n: int, labels: tuple[str, ...] = ("pos", "neg")) -> list[tuple[str, str]]:
    """n distinct rows, each naming its node and row ("n1r3"), cycling through labels."""
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        word = (GOOD if label == "pos" else BAD)[i % 5]
        rows.append((f"n{node}r{i} the movie is {word} .", label))
    return rows


def expected_sha(rows: list[tuple[str, str]]) -> str:
    """The fingerprint as documented (`cotune.data.registry.fingerprint`), computed here
    from the rows themselves: sha256 of the sorted `json.dumps([text, null, label])`."""
    lines = sorted(json.dumps([text, None, label]) for text, label in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def node_files(tmp_path: Path) -> tuple[list[Path], list[list[tuple[str, str]]]]:
    """Three nodes of 5, 6 and 7 distinct rows; node 2 holds one class only."""
    rows = [node_rows(0, 5), node_rows(1, 6), node_rows(2, 7, ("pos",))]
    return [write_rows(tmp_path / f"node{i}" / "mine.csv", r) for i, r in enumerate(rows)], rows


# ---------------------------------------------------------------------------- splitfed

# Single WordPiece tokens, so every example has the same number of tokens.
WORDS = ["red", "blue", "green", "black", "white", "brown", "gold", "pink", "gray"]


def write_e2e(folder: Path, n_train: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"name[{w}], eatType[pub]", f"{w} is a pub near the river.") for w in WORDS]
    for name, part in (("trainset.csv", rows[:n_train]), ("testset_w_refs.csv", rows[:2])):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows(part)
    return str(folder)


def splitfed_config(data_dir: str, **over):  # type: ignore[no-untyped-def]
    raw = {
        "method": "splitfed",
        "seed": 3,
        "task": {"name": "e2e", "data_dir": data_dir},
        "model": {"name": "tiny-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "train": {"steps": 1, "batch_size": 2, "max_seq_len": 32, "label_smoothing": 0.1},
        "split": {"cut": 2},
        "federated": {"clients": 3, "aggregate_every": 1, "round_timeout": 60},
        "runtime": {"timeout_s": 120},
    }
    for section, values in over.items():
        raw[section] = {**raw.get(section, {}), **values}
    return build_config(raw)


# ------------------------------------------------------------------------------- squad

NAMES = ["car", "house", "door", "kite", "boat", "hat", "cup", "bike"]


def write_squad(folder: Path, n_articles: int = 6, per_article: int = 4, seed: int = 0) -> Path:
    """A SQuAD v1.1 folder (dev-v1.1.json only): each article one paragraph of
    "the <thing> is <colour> ." sentences; each question asks a thing's colour."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for a in range(n_articles):
        things = rng.sample(NAMES, per_article)
        colours = [rng.choice(WORDS) for _ in things]
        sentences = [f"the {t} is {c} ." for t, c in zip(things, colours, strict=True)]
        context = " ".join(sentences)
        qas = []
        for q, (t, c) in enumerate(zip(things, colours, strict=True)):
            start = context.index(f"the {t} is ") + len(f"the {t} is ")
            answer = {"text": c, "answer_start": start}
            qas.append({"id": f"a{a}q{q}", "question": f"what colour is the {t} ?",
                        "answers": [answer, answer]})  # fmt: skip
        data.append({"title": f"Article_{a}", "paragraphs": [{"context": context, "qas": qas}]})
    (folder / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": data}))
    return folder


def tiny_fedlora_run_args(tmp_path: Path, run_dir: Path, *sets: str) -> list[str]:
    """`cotune run` arguments for a tiny fedlora run on a small written SST-2 (80 phrases;
    tiny-bert, batch 8 x 24 tokens, 2 local steps, 32 eval examples), plus `sets`."""
    data = write_sst2(tmp_path, n_train=80)
    base = ("method=fedlora", "model.name=tiny-bert", "task.name=glue/sst2",
            f"task.data_dir={data}", "task.max_eval_examples=32", "train.batch_size=8",
            "train.max_seq_len=24", "federated.local_steps=2")  # fmt: skip
    args = ["run", "--out", str(run_dir)]
    for kv in (*base, *sets):
        args += ["--set", kv]
    return args
