"""`cotune demo`: the comparison page from run folders, a tiny end-to-end demo, and bad
input -> exit 2 with a message and no traceback."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from cotune.cli.main import main
from cotune.report import RunFolder, finish_run
from cotune.report.demo import PAGE_FILE, PLOT_FILE, demo_rows, write_demo_page

PNG = b"\x89PNG\r\n\x1a\n"


def _run_folder(path: Path, config: str, acc: float, up: int, trainable: int) -> Path:
    run = RunFolder(path)
    run.write_config(config)
    run.log_train({"step": 10, "loss": 0.3})
    run.log_eval({"step": 10, "accuracy": acc, "bytes_up": up, "bytes_down": up // 4,
                  "wall_s": 2.0})  # fmt: skip
    run.write_summary(
        {
            "method": re.search(r'method = "(\w+)"', config).group(1),  # type: ignore[union-attr]
            "task": "bbc-news",
            "model": "tiny-bert",
            "metrics": {"accuracy": acc, "loss": 0.4},
            "comm": {"bytes_up": up, "bytes_down": up // 4},
            "wall_s": 12.5,
            "device_peak_bytes": 300_000_000,
            "trainable_params": {"device": trainable, "cloud": 7},
            "saved_activation_bytes": 0,
        }
    )
    finish_run(run)
    return run.path


def _three_runs(tmp_path: Path) -> list[Path]:
    central = (
        'method = "centralized"\n[model]\nlora = { r = 8 }\n[train]\nsteps = 40\nbatch_size = 16\n'
    )
    split = (
        'method = "split"\n[train]\nsteps = 40\nbatch_size = 16\n[split]\ncut = 3\n'
        '[link]\ncodec = "sft"\nrank = 8\n'
    )
    fed = (
        'method = "fedlora"\n[model]\nlora = { r = 4 }\n[federated]\nclients = 4\n'
        'rounds = 2\nlocal_steps = 10\npartition = "iid"\n'
    )
    return [
        _run_folder(tmp_path / "runs" / "central", central, 0.9312, 0, 150_000),
        _run_folder(tmp_path / "runs" / "split", split, 0.9045, 2_500_000, 9_000_000),
        _run_folder(tmp_path / "runs" / "fed", fed, 0.9178, 40_000_000, 1_234),
    ]


def test_page_has_a_row_per_run_folder_and_the_plot(tmp_path) -> None:
    runs = _three_runs(tmp_path)
    page = write_demo_page(tmp_path / "demo", runs, title="t", notes=["a note"])
    assert page == tmp_path / "demo" / PAGE_FILE
    text = page.read_text()
    rows = re.findall(r"<tr><td>.*?</tr>", text)
    assert len(rows) == 3
    central, split, fed = rows
    assert "central" in central and "0.9312" in central and "0 B" in central
    assert "LoRA r=8; 40 steps of 16" in central and "150.00K" not in central
    assert "0.15M" in central  # device trainable params
    assert "0.9045" in split and "2.50 MB" in split and "625.00 kB" in split
    assert "layers &lt; 3 + layer 3&#x27;s attention" in split
    assert "sft r=8;" in split and "9.00M" in split
    assert "0.9178" in fed and "40.00 MB" in fed and "1.2K" in fed
    assert "4 devices (iid), 2 rounds of 10 local steps; LoRA r=4" in fed
    for row in rows:
        assert "300.00 MB" in row and "12.5 s" in row
    # each row links to its run's own report, relative to the page
    assert 'href="../runs/central/report.html"' in central
    assert "a note" in text
    # the plot: beside the page and embedded in it
    plot = tmp_path / "demo" / PLOT_FILE
    assert plot.read_bytes()[:8] == PNG
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded is not None
    assert base64.b64decode(embedded.group(1)) == plot.read_bytes()


def test_rows_reject_a_folder_that_is_not_a_run(tmp_path) -> None:
    from cotune.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a finished run folder"):
        demo_rows([tmp_path / "empty"])


def _sst2(folder: Path) -> None:
    folder.mkdir(parents=True)
    rows = ["a gorgeous , witty movie .\t1", "a dull , lifeless mess .\t0",
            "charming and hilarious .\t1", "the plot is boilerplate .\t0"]  # fmt: skip
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 6) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


COMMON = (
    '[task]\nname = "glue/sst2"\ndata_dir = "data/SST-2"\n'  # relative to the config
    "[train]\nsteps = 2\nbatch_size = 4\nmax_seq_len = 16\n"
)


@pytest.mark.slow
def test_demo_runs_every_row_and_writes_the_page(tmp_path, capsys, one_thread) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    _sst2(configs / "data" / "SST-2")
    lora = "lora = { r = 2 }\n"
    for name, method, extra in (
        ("a-central", "centralized", ""),
        ("b-split", "split", '[split]\ncut = 1\n[link]\ncodec = "sft"\nrank = 4\n'),
        ("c-fedlora", "fedlora", "[federated]\nclients = 2\nrounds = 1\nlocal_steps = 2\n"
                                 '[runtime]\nengine = "inline"\n'),
    ):  # fmt: skip
        model = f'[model]\nname = "tiny-bert"\n{"" if method == "split" else lora}'
        (configs / f"{name}.toml").write_text(
            f'name = "{name}"\nmethod = "{method}"\n{model}{COMMON}{extra}'
        )
    out = tmp_path / "demo"
    code = main(["--quiet", "demo", str(configs), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    page = (out / PAGE_FILE).read_text()
    for name, method in (("a-central", "centralized"), ("b-split", "split"),
                         ("c-fedlora", "fedlora")):  # fmt: skip
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["method"] == method
        acc = f"{summary['metrics']['accuracy']:.4f}"
        row = re.search(rf"<tr><td><a [^>]*>{name}</a>.*?</tr>", page)
        assert row is not None, name
        assert acc in row.group(0)
        assert name in stdout and f"demo row {name}" in err
    assert (out / PLOT_FILE).read_bytes()[:8] == PNG
    assert "3 rows in" in stdout and str(out / PAGE_FILE) in stdout


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist or is not a folder"),
        ("empty", "holds no *.toml config"),
        ("bad", "demo row b.toml"),
    ],
)
def test_demo_bad_input_exits_2_before_running(tmp_path, capsys, setup, message) -> None:
    folder = tmp_path / "configs"
    if setup != "missing":
        folder.mkdir()
    if setup == "bad":  # a good row first: nothing may run before every row is checked
        (folder / "a.toml").write_text('method = "centralized"\n[model]\nname = "tiny-bert"\n')
        (folder / "b.toml").write_text('method = "centralized"\n[train]\nstepz = 3\n')
    out = tmp_path / "demo"
    code = main(["demo", str(folder), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("cotune: error:") and message in err
    assert "Traceback" not in err
    assert not out.exists()
