"""Names shared by the ServerApp and the ClientApp (message records, node config,
run-folder files). Kept import-light: the ClientApp process loads this first."""

from pathlib import Path
from typing import NoReturn

ARRAYS_KEY = "arrays"  # ArrayRecord: the global state (down) or a client's update (up)
CONFIG_KEY = "config"  # ConfigRecord: server-round and the experiment config
METRICS_KEY = "metrics"  # MetricRecord of a reply
WEIGHT_KEY = "num-examples"  # a client's weight in the average
CONFIG_TEXT_KEY = "cotune-config"  # the resolved experiment config as TOML text
PARTITION_KEY = "partition-id"  # SuperNode node config: which partition it holds
NUM_PARTITIONS_KEY = "num-partitions"
# node config of a SuperNode with its own data (federated.client_data = "node"): the
# file or folder it trains on, and optionally what it scores the global model on when
# the server has no evaluation data (default: its training data)
DATA_PATH_KEY = "data-path"
EVAL_PATH_KEY = "eval-path"
NODE_KEY = "node"  # ConfigRecord of a reply: what a node's own data is (or why it fails)
TRAIN_S_KEY = "train-s"  # MetricRecord of a train reply: the client's local training, s
SHA_KEY = "data-sha256"  # the fingerprint of a node's training examples
EXAMPLES_KEY = "examples"
LABELS_KEY = "labels"
ERROR_KEY = "error"

# a SuperNode's node config (what `--node-config` gives, e.g. data-path)
NodeConfig = dict[str, str | int | float | bool]

RESULT_FILE = "federated_result.json"  # written by the ServerApp at the end
ERROR_FILE = "federated_error.txt"  # written by the ServerApp if it fails
# ... and this one too when the failure is the user's to fix (bad data, config): its
# text is the message `cotune run` prints before exiting with status 2
USER_ERROR_FILE = "federated_user_error.txt"
# environment variable: a file the ServerApp appends the path of every file it opens to
# (an audit that the server reads no training data)
AUDIT_OPENS_ENV = "COTUNE_AUDIT_OPENS"


def number(value: object, what: str) -> float:
    """A record value that must be a single number (Flower records also hold lists)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def raise_server_error(run_dir: Path) -> NoReturn:
    """The ServerApp's failure as an exception: a `UserError` (the CLI exits with status
    2) when it was the user's to fix, else a RuntimeError with its traceback."""
    from cotune.errors import UserError

    user = run_dir / USER_ERROR_FILE
    if user.exists():
        raise UserError(user.read_text())
    error = run_dir / ERROR_FILE
    detail = error.read_text() if error.exists() else "(no error report)"
    raise RuntimeError(f"the federated ServerApp ended without a result:\n{detail}")
