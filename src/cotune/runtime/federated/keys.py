"""Names shared by the ServerApp and the ClientApp (message records, node config,
run-folder files). Kept import-light: the ClientApp process loads this first."""

ARRAYS_KEY = "arrays"  # ArrayRecord: the global state (down) or a client's update (up)
CONFIG_KEY = "config"  # ConfigRecord: server-round and the experiment config
METRICS_KEY = "metrics"  # MetricRecord of a reply
WEIGHT_KEY = "num-examples"  # a client's weight in the average
CONFIG_TEXT_KEY = "cotune-config"  # the resolved experiment config as TOML text
PARTITION_KEY = "partition-id"  # SuperNode node config: which partition it holds
NUM_PARTITIONS_KEY = "num-partitions"

RESULT_FILE = "federated_result.json"  # written by the ServerApp at the end
ERROR_FILE = "federated_error.txt"  # written by the ServerApp if it fails


def number(value: object, what: str) -> float:
    """A record value that must be a single number (Flower records also hold lists)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)
