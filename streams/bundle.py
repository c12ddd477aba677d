"""The model bundle contract: which files a bundle holds, their ONNX signatures, the manifest.

`model_export` writes bundles against this contract; the worker, the refresher and the
offline evaluation read them through `load_bundle`. No torch here.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streams.errors import BundleError

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: the item-item model in fusion.onnx; 3: the long-term model
MANIFEST = "manifest.json"
PAD_ROW = 0  # row 0 of every item table is padding; real items start at row 1


@dataclass(frozen=True)
class OnnxSignature:
    """Input/output names and named dynamic axes of one ONNX graph, declared once."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


SHORT_TERM = OnnxSignature(
    inputs=("item_rows", "mask"),  # (B, T) int64 left-padded; (B, T) float32 1=real item
    outputs=("h_s",),  # (B, D)
    dynamic_axes={
        "item_rows": {0: "batch", 1: "length"},
        "mask": {0: "batch", 1: "length"},
        "h_s": {0: "batch"},
    },
)
TEXT_ENCODER = OnnxSignature(
    inputs=("input_ids", "attention_mask"),  # (B, L) int64 each
    outputs=("embedding",),  # (B, E) L2-normalised mean pooling
    dynamic_axes={
        "input_ids": {0: "batch", 1: "tokens"},
        "attention_mask": {0: "batch", 1: "tokens"},
        "embedding": {0: "batch"},
    },
)
FUSION = OnnxSignature(
    inputs=(
        "h_s",  # (B, D) short-term vector
        "h_l",  # (B, D) projected long-term vector (zeros when missing)
        "has_long",  # (B, 1) 1.0 when h_l is real
        "hist_e",  # (B, N, D) projected BERT vectors of the user's history items
        "hist_rows",  # (B, N) int64 those items' rows (the item-item model's input)
        "hist_mask",  # (B, N) 1.0 for real history entries
        "dt",  # (B, 1) log1p(seconds since the user's previous event)
        "seen_mask",  # (B, n_rows) 1.0 = never recommend this row
        "mode",  # (3,) one-hot over (fixed, attention, gate)
        "fixed_alpha",  # (1,) short-term weight of the fixed mode
        "item_item_weight",  # (1,) the item-item scores' weight in every mode (0: off)
        "k",  # (1,) int64: how many items to return, 1..dims.max_k
    ),
    # (B,D) (B,1) (B,k) (B,k) (B,k): the last, the item-item share of each top score
    outputs=("fused", "alpha", "top_scores", "top_rows", "top_item_item"),
    dynamic_axes={
        "h_s": {0: "batch"},
        "h_l": {0: "batch"},
        "has_long": {0: "batch"},
        "hist_e": {0: "batch", 1: "history"},
        "hist_rows": {0: "batch", 1: "history"},
        "hist_mask": {0: "batch", 1: "history"},
        "dt": {0: "batch"},
        "seen_mask": {0: "batch"},
        "fused": {0: "batch"},
        "alpha": {0: "batch"},
        "top_scores": {0: "batch", 1: "k"},
        "top_rows": {0: "batch", 1: "k"},
        "top_item_item": {0: "batch", 1: "k"},
    },
)
LONG_TERM = OnnxSignature(
    inputs=(
        "item_rows",  # (B, W) int64 the user's newest items, left-padded with row 0
        "weights",  # (B, W) float32 recency x event-type weight, 0 at padding
    ),
    outputs=("h_l", "pooled"),  # (B, D) long-term vector; (B, C) the weighted mean it comes from
    dynamic_axes={
        "item_rows": {0: "batch", 1: "window"},
        "weights": {0: "batch", 1: "window"},
        "h_l": {0: "batch"},
        "pooled": {0: "batch"},
    },
)
LONG_TERM_HEAD = OnnxSignature(  # the head alone, for a pooled mean brought up to date
    inputs=("pooled",),  # (B, C)
    outputs=("h_l",),  # (B, D)
    dynamic_axes={"pooled": {0: "batch"}, "h_l": {0: "batch"}},
)
FUSION_MODES = ("fixed", "attention", "gate")
# fusion.onnx's top_scores value for a row masked by seen_mask (padding, a recent item): such a
# row reaches top_rows only when fewer than k rows are left unmasked, and is never served.
MASKED_SCORE = -1e9

FILES = {
    "short_term": "short_term.onnx",
    "text_encoder": "text_encoder.onnx",
    "fusion": "fusion.onnx",
    "tokenizer": "tokenizer.json",
    "items": "items.json",  # [{"item_id", "title", "text"}], row = index + 1
    "item_text_emb": "item_text_emb.npy",  # (n_rows, E) BERT embedding per item row
    "item_long_emb": "item_long_emb.npy",  # (n_rows, D) projected item embeddings (e_i)
    "projection": "projection.npz",  # W (E, D), b (D,): BERT space -> GPT space
    "popularity": "popularity.npy",  # (n_rows,) training-set counts, the cold-start ranking
    "item_emb": "item_emb.npy",  # (n_rows, D) GPT item embeddings: score(i) = interest . E_i
    "long_term": "long_term.onnx",  # the long-term model over a user's newest items
    "long_term_head": "long_term_head.onnx",  # its head: pooled mean -> h_l
    "long_item_in": "long_item_in.npy",  # (n_rows, C) its item inputs: what `pooled` averages
    # rows, weights (n_rows, K): each item's strongest successors, as fusion.onnx holds them
    "item_neighbours": "item_neighbours.npz",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ItemIndex:
    """Row <-> item_id mapping and titles. Row 0 is padding."""

    # index = row; row 0 (padding) None: the worker renders with one tuple index per field
    ids_by_row: tuple[str | None, ...]
    titles_by_row: tuple[str | None, ...]
    texts: tuple[str, ...]  # index = row - 1
    row_of: dict[str, int]

    @classmethod
    def from_records(cls, records: list[dict]) -> "ItemIndex":
        ids = tuple(str(r["item_id"]) for r in records)
        if len(set(ids)) != len(ids):
            raise BundleError("items.json lists an item_id twice; rebuild the bundle")
        return cls(
            ids_by_row=(None, *ids),
            titles_by_row=(None, *(r.get("title", "") for r in records)),
            texts=tuple(r.get("text", "") for r in records),
            row_of={item: row for row, item in enumerate(ids, start=1)},
        )

    @property
    def item_ids(self) -> tuple[str, ...]:
        """The catalog's item ids in row order (row 1 first)."""
        return self.ids_by_row[1:]

    @property
    def n_rows(self) -> int:
        return len(self.ids_by_row)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.row_of


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    items: ItemIndex

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]

    def file(self, key: str) -> Path:
        return self.path / FILES[key]

    def array(self, key: str) -> np.ndarray:
        return np.load(self.file(key))

    def item_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.file("item_neighbours")) as data:
            return data["rows"].astype(np.int64), data["weights"].astype(np.float32)

    def projection(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.file("projection")) as data:
            return data["W"].astype(np.float32), data["b"].astype(np.float32)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory, checking that every file exists and matches its checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"no model bundle at {path}: {manifest_path} is missing. Build one with "
            f"`make models` or `python -m model_export build --out {path}`, or set BUNDLE_DIR."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); rebuild the bundle") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format {manifest.get('format')!r}, this code reads "
            f"{FORMAT_VERSION}; rebuild the bundle"
        )
    for name in FILES.values():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"bundle file {file_path} is missing; rebuild the bundle")
        if verify:
            expected = manifest.get("files", {}).get(name)
            actual = sha256_file(file_path)
            if expected != actual:
                raise BundleError(
                    f"bundle file {file_path} is corrupt: sha256 {actual[:12]}… does not match "
                    f"the manifest's {str(expected)[:12]}…; rebuild the bundle"
                )
    try:
        items = ItemIndex.from_records(json.loads((path / FILES["items"]).read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path / FILES['items']} is unreadable ({exc})") from exc
    log.info("loaded bundle %s (%d items) from %s", manifest["version"], len(items.item_ids), path)
    return Bundle(path=path, manifest=manifest, items=items)


def write_manifest(path: Path, manifest: dict) -> dict:
    """Complete `manifest` with the sha256 of every bundle file and write manifest.json."""
    manifest = dict(manifest, format=FORMAT_VERSION)
    manifest["files"] = {name: sha256_file(path / name) for name in FILES.values()}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
