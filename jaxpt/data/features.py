"""Per-example array work for the Grain pipelines: a compact document store, next-token
targets, padding to a fixed row, and the packed-row field names.

Row fields (all [seq_len]): input_ids int32; target_ids int32, the next token of the same
document (0 where there is none); loss_mask float32, 1.0 where target_ids[t] is trained;
positions int32, 0.. within each document; segment_ids int32, 1, 2, .. per document, 0 on
padding.
"""

from collections.abc import Sequence

import numpy as np


class RaggedStore:
    """Random-access rows of variable-length arrays, kept as flat arrays plus offsets.

    A Grain source: cheap to pickle into worker processes, unlike a list of small arrays.
    Scalar fields are stored as one array with a value per row.
    """

    def __init__(self, rows: Sequence[dict]):
        if not rows:
            raise ValueError("RaggedStore needs at least one row")
        self._ragged, self._scalar = {}, {}
        for key, value in rows[0].items():
            if np.ndim(value) == 0:
                self._scalar[key] = np.asarray([row[key] for row in rows])
            else:
                lengths = np.fromiter((len(row[key]) for row in rows), np.int64, len(rows))
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                flat = np.concatenate([np.asarray(row[key]) for row in rows])
                self._ragged[key] = (flat, offsets)
        self._len = len(rows)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        row = {
            key: flat[offsets[index] : offsets[index + 1]]
            for key, (flat, offsets) in self._ragged.items()
        }
        row.update({key: values[index] for key, values in self._scalar.items()})
        return row


def next_token_fields(ids_l: np.ndarray, mask_l: np.ndarray) -> dict:
    """input_ids, target_ids and loss_mask of one document (targets never leave it).

    `mask_l[t]` says token t is trained, so the loss at position t uses mask_l[t + 1].
    """
    zero = np.zeros(1, np.int32)
    return {
        "input_ids": ids_l.astype(np.int32),
        "target_ids": np.concatenate([ids_l[1:].astype(np.int32), zero]),
        "loss_mask": np.concatenate([mask_l[1:], zero]).astype(np.float32),
    }


def document_row(doc: dict) -> dict:
    """Grain map: a stored {"ids", "mask"} document to its unpadded next-token fields."""
    return next_token_fields(doc["ids"], doc["mask"])


def pad_row(fields: dict, seq_len: int) -> dict:
    """One document alone in a row of `seq_len`: zero padding, segment 1, positions 0..n-1."""
    n = len(fields["input_ids"])
    row = {key: _pad(value, seq_len) for key, value in fields.items()}
    row["segment_ids"] = _pad(np.ones(n, np.int32), seq_len)
    row["positions"] = _pad(np.arange(n, dtype=np.int32), seq_len)
    return row


def _pad(values_l: np.ndarray, seq_len: int) -> np.ndarray:
    return np.pad(values_l, (0, seq_len - len(values_l)))


def rename_packed_row(packed: dict) -> dict:
    """Grain's packer names segment ids/positions per feature; keep one copy under our names."""
    return {
        "input_ids": packed["input_ids"],
        "target_ids": packed["target_ids"],
        "loss_mask": packed["loss_mask"],
        "segment_ids": packed["input_ids_segment_ids"],
        "positions": packed["input_ids_positions"],
    }


def preference_row(pair: dict, seq_len: int) -> dict:
    """Grain map: a stored pair to chosen_*/rejected_* rows (prompt + response), margin and
    pair_mask (1.0; padded rows of a short last batch get 0)."""
    row = {"margin": np.float32(pair["margin"]), "pair_mask": np.float32(1.0)}
    prompt_ids = pair["prompt_ids"]
    for side in ("chosen", "rejected"):
        ids_l = np.concatenate([prompt_ids, pair[f"{side}_ids"]])
        mask_l = np.concatenate([np.zeros(len(prompt_ids), bool), pair[f"{side}_mask"]])
        fields = pad_row(next_token_fields(ids_l, mask_l), seq_len)
        row.update({f"{side}_{key}": value for key, value in fields.items()})
    return row


def unpaired_row(example: dict, seq_len: int) -> dict:
    """Grain map: a stored unpaired example to its row (prompt + completion) with ``label``
    (1.0 desirable, 0.0 undesirable), ``example_mask`` (1.0; 0 on padded rows) and
    ``prompt_length`` (its prompt tokens: where the completion starts)."""
    prompt_ids = example["prompt_ids"]
    ids_l = np.concatenate([prompt_ids, example["completion_ids"]])
    mask_l = np.concatenate([np.zeros(len(prompt_ids), bool), example["completion_mask"]])
    row = pad_row(next_token_fields(ids_l, mask_l), seq_len)
    row.update(label=np.float32(example["label"]), example_mask=np.float32(1.0),
               prompt_length=np.int32(len(prompt_ids)))
    return row


def step_row(example: dict, seq_len: int) -> dict:
    """Grain map: a stored step-labelled example to its row (prompt + steps) with
    ``step_labels`` [seq_len] (1 good / 0 bad on each step's last token, -1 elsewhere),
    ``response_mask`` [seq_len] (1.0 on the steps' tokens) and ``example_mask`` (1.0; 0 on
    padded rows)."""
    prompt_ids = example["prompt_ids"]
    ids_l = np.concatenate([prompt_ids, example["completion_ids"]]).astype(np.int32)
    row = pad_row({"input_ids": ids_l}, seq_len)
    labels_l = np.where(example["completion_mask"], example["completion_labels"], -1)
    labels_l = np.concatenate([np.full(len(prompt_ids), -1), labels_l]).astype(np.int32)
    row["step_labels"] = np.pad(labels_l, (0, seq_len - len(labels_l)), constant_values=-1)
    row["response_mask"] = _pad(np.arange(len(ids_l)) >= len(prompt_ids), seq_len).astype(
        np.float32)
    row["example_mask"] = np.float32(1.0)
    return row


def mismatched_rows(batch: dict) -> dict:
    """KTO's reference point rows: row i's prompt followed by row (i + 1)'s completion, as
    ``kl_{input_ids,target_ids,loss_mask,positions,segment_ids}`` [B, S] (cut at S; a row
    whose neighbour has no completion, such as padding, trains nothing)."""
    b, s = batch["input_ids"].shape
    lengths = batch["segment_ids"].astype(bool).sum(1)  # one document per row
    out = {f"kl_{k}": np.zeros((b, s), np.float32 if k == "loss_mask" else np.int32)
           for k in ("input_ids", "target_ids", "loss_mask", "positions", "segment_ids")}
    for i in range(b):
        j = (i + 1) % b
        p = int(batch["prompt_length"][i])
        if not batch["example_mask"][i] or p == 0:
            continue
        tokens_i = _tokens(batch, i, lengths[i])
        tokens_j = _tokens(batch, j, lengths[j])
        completion = tokens_j[int(batch["prompt_length"][j]):] if batch["example_mask"][j] else []
        ids_l = np.concatenate([tokens_i[:p], completion]).astype(np.int32)[:s]
        mask_l = np.zeros(len(ids_l), bool)
        mask_l[p:] = True
        row = pad_row(next_token_fields(ids_l, mask_l), s)
        for key, value in row.items():
            out[f"kl_{key}"][i] = value
    return out


def _tokens(batch: dict, i: int, length: int) -> np.ndarray:
    """Row ``i``'s token sequence (a row's inputs are all its tokens; see pad_row)."""
    return batch["input_ids"][i, :length]
