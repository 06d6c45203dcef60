"""What every CLI command shares: consoles, connection options, the API client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from consortia.errors import ConsortiaError

__all__ = ["DEFAULT_URL", "CoordinatorOpt", "HomeOpt", "TokenOpt", "client", "console", "err"]

console = Console()
err = Console(stderr=True)

CoordinatorOpt = Annotated[str, typer.Option("--coordinator", envvar="CONSORTIA_COORDINATOR", help="coordinator URL")]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="CONSORTIA_TOKEN", help="bearer credential (default: HOME/admin.token)")
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="CONSORTIA_HOME", help="coordinator home to read admin.token from")
]
DEFAULT_URL = "http://127.0.0.1:8700"


def client(coordinator: str, token: str | None, home: Path | None):  # type: ignore[no-untyped-def]
    from consortia.site.client import CoordinatorClient

    if token is None and home is not None:
        path = home / "admin.token"
        if not path.exists():
            raise ConsortiaError(f"no credential: {path} does not exist; pass --token.")
        token = path.read_text().strip()
    if token is None:
        raise ConsortiaError("no credential: pass --token, set CONSORTIA_TOKEN or --home.")
    return CoordinatorClient(coordinator, token)
