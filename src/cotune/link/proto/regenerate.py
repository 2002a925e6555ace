"""Regenerate `cotune_link_pb2.py` and its type stub `cotune_link_pb2.pyi` from
`cotune_link.proto` (run after editing the .proto file).

    .venv/bin/python -m cotune.link.proto.regenerate

The generated module is committed, so installing cotune needs no build step. The gRPC
service is registered with generic handlers (see `cotune.link.grpc_transport`), so no
`_pb2_grpc` module is generated.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc  # grpcio-tools, in the dev extra (pip install -e ".[dev]")

    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={HERE}",
            f"--pyi_out={HERE}",
            str(HERE / "cotune_link.proto"),
        ]  # fmt: skip
    )
    if code != 0:
        return int(code)
    out = HERE / "cotune_link_pb2.py"
    out.write_text("# ruff: noqa\n" + out.read_text())
    subprocess.run([sys.executable, "-m", "ruff", "format", str(out)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
