"""cotune's Flower App: the ServerApp and ClientApp that run every federated method.

`[tool.flwr.app.components]` names `cotune.flower_app:server_app` and
`cotune.flower_app:client_app`. Two folders hold the App's pyproject.toml:

- `app/` in this package (`APP_DIR`): what `cotune run` submits with `flwr run`, on
  every engine (its run config: `run-dir`, `resume`, `stop-after`, `connect-timeout`,
  `config`);
- `flower-app/` at the root of cotune's repository: the same App with a tiny default
  experiment (`[tool.flwr.app.config.cotune]`) and the `local-simulation` federation,
  for `flwr run flower-app local-simulation` (docs/federated.md).

The import stays light (no torch): a SuperNode loads the ClientApp in a fresh process
for every message.
"""

from pathlib import Path

from cotune.runtime.federated.apps import client_app, server_app

APP_DIR = Path(__file__).resolve().parent / "app"

__all__ = ["APP_DIR", "client_app", "server_app"]
