"""``consortia predict`` (precompute) and ``consortia serve`` (model as a service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consortia.cli.common import console, err
from consortia.errors import ValidationError

__all__ = ["predict", "serve"]


def _read(path: Path):  # type: ignore[no-untyped-def]
    import pandas as pd

    if not path.is_file():
        raise ValidationError(f"input file {path} does not exist.")
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise ValidationError(f"input {path.name}: expected a .csv or .parquet file.")


def predict(
    release: Annotated[Path, typer.Option(help="release bundle directory (from `registry verify --dir`)")],
    input: Annotated[Path, typer.Option("--input", help="rows to score (.csv or .parquet)")],
    output: Annotated[Path, typer.Option("--output", help="where to write rows + probability + decision")],
    batch_rows: Annotated[int, typer.Option(help="rows per ONNX Runtime call")] = 65536,
) -> None:
    """Precompute: score a file with a verified release (ONNX Runtime, no torch)."""
    import numpy as np

    from consortia.edge.runtime import load_release

    if output.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise ValidationError(f"output {output.name}: expected a .csv or .parquet file.")
    if batch_rows < 1:
        raise ValidationError(f"--batch-rows == {batch_rows}, must be >= 1.")
    rel = load_release(release)
    frame = _read(input)
    probs = np.concatenate(
        [rel.predict(frame.iloc[i : i + batch_rows]) for i in range(0, len(frame), batch_rows)] or [np.zeros(0)]
    )
    out = frame.copy()
    out["probability"] = probs
    out["decision"] = probs >= rel.threshold
    out["release"] = rel.ref
    tmp = output.with_name(output.name + ".tmp")
    if output.suffix.lower() == ".csv":
        out.to_csv(tmp, index=False)
    else:
        out.to_parquet(tmp, index=False)
    tmp.replace(output)
    err.print(f"scored {len(out)} rows with {rel.ref} (threshold {rel.threshold}) -> {output}")


def serve(
    release: Annotated[Path, typer.Option(help="release bundle directory")],
    host: Annotated[str, typer.Option(help="bind address (inside the institution)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8800,
    token: Annotated[
        str | None, typer.Option(envvar="CONSORTIA_SERVING_TOKEN", help="bearer token callers must send")
    ] = None,
) -> None:
    """Model as a service: POST /v1/predict (single rows and batches, JSON in/out)."""
    import secrets

    import uvicorn

    from consortia.edge.serving import create_serving_app

    if token is None:
        token = secrets.token_urlsafe(32)
        err.print(f"serving token (give it to callers; not stored): {token}")
    app = create_serving_app(release, token)
    console.print(f"serving {app.state.release.ref} on http://{host}:{port}/v1/predict")
    uvicorn.run(app, host=host, port=port, log_level="warning")
