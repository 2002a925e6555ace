"""`cotune keys init` / `cotune keys add-node`: the CA, server certificate and SuperNode
key pairs of a secure deployment (see docs/security.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cotune.errors import ConfigError

INSECURE_HELP = (
    "opt out of TLS and authentication (the loopback federation, `flwr run`, a split cloud "
    "or device on a non-loopback address); for trusted networks only: warned about"
)


def cmd_keys(args: argparse.Namespace) -> int:
    from cotune.runtime.federated.credentials import KeyFolder, add_node, init_keys

    if args.keys_command == "init":
        names = args.node or [f"node-{i}" for i in range(args.nodes or 0)]
        if not names and args.nodes is None and not KeyFolder(Path(args.folder)).node_names():
            names = ["node-0", "node-1"]  # a new folder; a re-issued one keeps its nodes' keys
        keys = init_keys(
            args.folder, hosts=args.host or None, nodes=names,
            ca_cert=args.ca_cert, ca_key=args.ca_key, force=args.force,
        )  # fmt: skip
        print(f"CA:         {keys.ca_cert} (give it to every SuperNode / device)")
        print(f"server:     {keys.server_cert}, {keys.server_key} (SuperLink or cloud only)")
        for name in names:
            print(f"node {name}: {keys.node_key(name)} (that node only), {keys.node_pub(name)}")
        return 0
    keys = KeyFolder(Path(args.folder))
    if not keys.ca_cert.is_file():
        raise ConfigError(
            f"{args.folder} is not a key folder (no {keys.ca_cert.name}); make one with "
            "`cotune keys init FOLDER`"
        )
    private, public = add_node(keys, args.name, force=args.force)
    print(f"node {args.name}: {private} (that node only), {public}")
    print(f"register it: flwr supernode register {public} <connection>")
    return 0


def add_keys_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "keys", parents=[common],
        help="make the CA, server certificate and SuperNode keys of a secure deployment",
    )  # fmt: skip
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = ks.add_parser("init", help="a new key folder: CA, server certificate, node key pairs")
    q.add_argument("folder", metavar="FOLDER", help="where the keys go (made private, 0700)")
    q.add_argument(
        "--host", action="append", default=[], metavar="NAME",
        help="a DNS name or IP address the server is reached at (repeatable; localhost, "
        "127.0.0.1 and ::1 are always included)",
    )  # fmt: skip
    q.add_argument(
        "--nodes", type=int, metavar="N",
        help="node key pairs node-0 ... node-(N-1) (default 2 in a new folder, none when "
        "FOLDER has node keys: re-issuing the certificates keeps them)",
    )  # fmt: skip
    q.add_argument("--node", action="append", default=[], metavar="NAME",
                   help="a node key pair by name (repeatable; replaces --nodes)")  # fmt: skip
    q.add_argument("--ca-cert", metavar="PEM", help="use this CA certificate (with --ca-key)")
    q.add_argument("--ca-key", metavar="PEM", help="the private key of --ca-cert")
    q.add_argument("--force", action="store_true", help="replace the keys already in FOLDER")
    q = ks.add_parser("add-node", help="one more SuperNode key pair in a key folder")
    q.add_argument("folder", metavar="FOLDER")
    q.add_argument("name", metavar="NAME", help="the node's name, e.g. node-2 or clinic-a")
    q.add_argument("--force", action="store_true", help="replace this node's key pair")
    p.set_defaults(func=cmd_keys)
