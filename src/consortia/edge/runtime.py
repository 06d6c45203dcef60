"""Run a release: verify the bundle, then predict with ONNX Runtime. No torch needed.

A release bundle is a directory with ``manifest.json`` listing every part by role, path,
SHA-256 and size (the ONNX graph, one file per weight tensor, config, smoke-test sample
inputs, model card, lineage), the outputs the trained model gives for the sample, and a
slot for a vector-index snapshot. :func:`verify_bundle` refuses a partial bundle (a part
missing) and a mixed one (a part whose hash is not this release's, or a file that is not
part of it). Devices hold the *inference* parts only (graph, tensors, config, sample);
the card and lineage are governance documents listed by hash and fetched on demand, so
``verify_bundle(path, documents=False)`` accepts their absence but still checks them when
present. :func:`load_release` verifies, opens an ONNX Runtime session and runs the smoke
test before handing the release out::

    release = consortia.load_release("rel/bundle")
    probabilities = release.predict(frame)          # pandas DataFrame or {column: values}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from consortia.errors import ReleaseError, ValidationError

__all__ = [
    "DOCUMENT_ROLES",
    "FORMAT",
    "MISSING",
    "Release",
    "load_release",
    "release_target_paths",
    "verify_bundle",
]

FORMAT = "consortia-release/3"
DOCUMENT_ROLES = frozenset({"card", "lineage"})  # governance documents, not needed to predict
MISSING = "<missing>"  # how training saw a missing categorical value (consortia.ml.data.MISSING)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_bundle(path: str | Path, *, documents: bool = True) -> dict[str, Any]:
    """Check a bundle against its manifest; returns the manifest or raises
    :class:`ReleaseError` naming the first problem. With ``documents=False`` the card and
    lineage may be absent (a device's bundle); every part present is checked either way."""
    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ReleaseError(f"{root} is not a release bundle: manifest.json is missing.")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise ReleaseError(f"{mpath} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ReleaseError(f"unsupported release format {manifest.get('format')!r}; expected {FORMAT!r}.")
    sample = manifest.get("sample")
    if not isinstance(sample, dict) or not isinstance(sample.get("expected"), list):
        raise ReleaseError("manifest has no smoke-test outputs ('sample.expected'); the release cannot be checked.")
    listed = {"manifest.json"}
    for part in manifest["parts"]:
        rel = part["path"]
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ReleaseError(f"part path {rel!r} escapes the bundle.")
        f = root / rel
        if not f.is_file() and not documents and part["role"] in DOCUMENT_ROLES:
            continue
        if not f.is_file():
            raise ReleaseError(f"partial bundle: {part['role']} part {rel} is missing.")
        if f.stat().st_size != part["size"]:
            raise ReleaseError(f"part {rel} has {f.stat().st_size} bytes, the manifest says {part['size']}.")
        if _sha256(f) != part["sha256"]:
            raise ReleaseError(f"mixed or tampered bundle: {rel} does not have this release's SHA-256.")
        listed.add(rel)
    extra = [p for p in sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()) if p not in listed]
    if extra:
        raise ReleaseError(f"mixed bundle: {extra[:5]} are not parts of {manifest['model']}:{manifest['version']}.")
    return manifest  # type: ignore[no-any-return]


def release_target_paths(manifest: dict[str, Any], *, documents: bool = True) -> dict[str, str]:
    """Bundle path -> TUF target path. Parts are content-addressed (``parts/<sha256>``),
    so whatever two releases share (base tensors, graph, config, sample) is one target
    and a device downloads it once; only the manifest is per release."""
    out = {"manifest.json": f"releases/{manifest['model']}/{manifest['version']}/manifest.json"}
    for part in manifest["parts"]:
        if documents or part["role"] not in DOCUMENT_ROLES:
            out[part["path"]] = f"parts/{part['sha256']}"
    return out


def _column(values: Any, kind: str) -> np.ndarray:
    if kind == "numeric":
        try:
            arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            import pandas as pd

            arr = pd.to_numeric(pd.Series(list(values)), errors="coerce").to_numpy(dtype=np.float64)
        return arr.reshape(-1, 1)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    return out.reshape(-1, 1)


def _from_series(series: Any, kind: str) -> np.ndarray:
    """A DataFrame column as training converted it (consortia.ml.data), fast for the
    common dtypes."""
    import pandas as pd

    if kind == "numeric":
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            return series.to_numpy(dtype=np.float64, na_value=np.nan).reshape(-1, 1)
        return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64).reshape(-1, 1)
    if pd.api.types.is_string_dtype(series):
        arr = series.to_numpy(dtype=object, na_value=None)
        if any(v is None or not isinstance(v, str) for v in arr):
            arr = series.astype("string").fillna(MISSING).to_numpy(dtype=object)
        return arr.reshape(-1, 1)
    return series.astype("string").fillna(MISSING).to_numpy(dtype=object).reshape(-1, 1)


@dataclass
class Release:
    """A verified, smoke-tested release, ready to predict."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    session: Any

    def __post_init__(self) -> None:
        self._output = ["probability"]
        self._kinds = [
            (c, k, np.dtype(np.float64) if k == "numeric" else np.dtype(object))
            for c, k in self.manifest["inputs"].items()
        ]

    @property
    def ref(self) -> str:
        return f"{self.manifest['model']}:{self.manifest['version']}"

    @property
    def columns(self) -> dict[str, str]:
        """Input column -> ``numeric`` or ``categorical``."""
        return dict(self.manifest["inputs"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def inputs(self, data: Any) -> dict[str, np.ndarray]:
        """ONNX inputs from a DataFrame, a mapping of columns (lists, scalars or typed
        numpy arrays), or a list of row dicts; conversions match training's."""
        if isinstance(data, list):
            for i, row in enumerate(data):
                missing = [c for c in self.columns if c not in row]
                if missing:
                    raise ValidationError(f"row {i} lacks input column(s) {missing}; send null for a missing value.")
            data = {c: [row[c] for row in data] for c in self.columns}
        frame = not isinstance(data, Mapping)
        feeds: dict[str, np.ndarray] = {}
        for col, kind, want in self._kinds:
            try:
                values = data[col]
            except KeyError:
                raise ValidationError(f"input lacks column {col!r}; {self.ref} needs {sorted(self.columns)}.") from None
            if type(values) is np.ndarray and values.dtype == want and values.ndim in (1, 2):
                feeds[col] = values.reshape(-1, 1)  # already typed: no per-value work on a hot path
            elif frame:
                feeds[col] = _from_series(values, kind)
            else:
                feeds[col] = _column([values] if values is None or np.isscalar(values) else values, kind)
        lengths = {len(a) for a in feeds.values()}
        if len(lengths) > 1:
            raise ValidationError(f"input columns have different lengths {sorted(lengths)}; give one value per row.")
        return feeds

    def _typed(self, data: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """``data`` itself if it holds exactly the input columns as numpy arrays of the
        right dtype (the hot path of a serving loop; ONNX Runtime checks shapes), else None."""
        if len(data) != len(self._kinds):
            return None
        for col, _, want in self._kinds:
            v = data.get(col)
            if v.__class__ is not np.ndarray or v.dtype is not want:
                return None
        return data

    def predict(self, data: Any) -> np.ndarray:
        """Positive-class probabilities, one per row."""
        if type(data) is dict and self._typed(data) is not None:
            try:  # the hot path: typed [rows, 1] arrays straight into ONNX Runtime
                return self.session.run(self._output, data)[0].astype(np.float64)  # type: ignore[no-any-return]
            except Exception:  # noqa: S110 - e.g. None in a string column: convert below, as training did
                pass
        feeds = self.inputs(data)
        try:
            out = self.session.run(["probability"], feeds)[0]
        except Exception as exc:  # onnxruntime's own exception types (e.g. None in a typed string array)
            raise ValidationError(f"input values do not fit {self.ref}: {exc}") from exc
        return out.astype(np.float64)  # type: ignore[no-any-return]

    def decide(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, decisions at the release's threshold)."""
        p = self.predict(data)
        return p, p >= self.threshold

    def smoke_test(self) -> None:
        """Run the signed sample input and compare with the expected output."""
        inputs = json.loads((self.path / self.manifest_part("sample")).read_text())
        signed = self.manifest["sample"]
        got = self.predict(inputs)
        want = np.asarray(signed["expected"], dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, atol=float(signed.get("tolerance", 1e-5)), rtol=0):
            worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            raise ReleaseError(
                f"{self.ref} failed its smoke test: outputs differ from the signed sample by {worst:.3g}."
            )

    def manifest_part(self, role: str) -> str:
        for part in self.manifest["parts"]:
            if part["role"] == role:
                return str(part["path"])
        raise ReleaseError(f"{self.ref} has no {role} part.")


def load_release(path: str | Path, *, smoke_test: bool = True, threads: int = 1) -> Release:
    """Verify the bundle at ``path``, open it with ONNX Runtime and smoke-test it."""
    import onnxruntime as ort

    root = Path(path)
    manifest = verify_bundle(root, documents=False)
    config = json.loads((root / next(p["path"] for p in manifest["parts"] if p["role"] == "config")).read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    graph = root / next(p["path"] for p in manifest["parts"] if p["role"] == "graph")
    try:
        session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ReleaseError(f"ONNX Runtime cannot load {graph}: {exc}") from exc
    release = Release(root, manifest, config, session)
    if smoke_test:
        release.smoke_test()
    return release
