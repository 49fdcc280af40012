"""What an export folder holds and how to read it: the graphs' names, the manifest, and the
checks that the files are the ones exported. Needs neither onnx nor a runtime, so that every
backend (onnx_export.py writes, backend.py and tensorrt.py read) shares it without importing
the others."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engines.base import EngineError

GRAPHS = ("denoiser", "pose_controlnet", "local_controlnet", "reference", "vae_encoder", "vae_decoder")
KV_PARTS = ("key1", "value1", "key2", "value2")  # per temporal module: its two attentions' K and V
MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 24


class ExportError(EngineError):
    """An export that cannot be done or did not produce a valid graph, or an export folder that
    cannot be used; the message says why."""


def file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def read_manifest(graph_dir: str | Path) -> dict:
    path = Path(graph_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{graph_dir}: no {MANIFEST} (export the graphs first: xportrait export --to {graph_dir})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: manifest format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def verify_files(graph_dir: Path, manifest: dict) -> None:
    """Every graph the manifest lists is there, unchanged (its sha256 matches)."""
    for name in GRAPHS:
        entry = manifest["graphs"].get(name)
        if entry is None:
            raise ExportError(f"{graph_dir}: the manifest lists no {name} graph (export all graphs)")
        files = [graph_dir / entry["file"]] + ([graph_dir / entry["external_data"]] if entry["external_data"] else [])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{graph_dir}: missing {', '.join(missing)}: export again")
        if file_hash(*files) != entry["graph_sha256"]:
            raise ExportError(f"{graph_dir / entry['file']}: changed since export (sha256 differs from the manifest)")
