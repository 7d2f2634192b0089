"""Grain pipelines that turn example files into fixed-shape numpy batches.

SFT batch (all [batch, seq_len]; row fields are described in `jaxpt.data.features`):
    input_ids, target_ids, positions, segment_ids: int32;  loss_mask: float32
Preference batch (one pair per row, never packed):
    {chosen,rejected}_{input_ids,target_ids,loss_mask,positions,segment_ids}: [batch, seq_len]
    margin, pair_mask: float32 [batch]   (pair_mask is 0 on padding rows of a short last batch)
Step batch (process reward models; one example per row, never packed):
    input_ids, positions, segment_ids, step_labels (1/0 at each step's end, -1 elsewhere):
    int32 [batch, seq_len];  response_mask (1 on the steps' tokens): float32 [batch, seq_len];
    example_mask: float32 [batch]
Unpaired batch (KTO; one example per row, never packed):
    the SFT fields, and kl_<field> (row i's prompt with row i+1's completion): [batch, seq_len]
    label, example_mask: float32 [batch];  prompt_length: int32 [batch]

Steps: load + validate -> this process's shard -> tokenize and fit to max_length (once, up
front, so the skip/truncate/drop counts are exact) -> Grain: shuffle by seed (reshuffled each
epoch) -> repeat -> next-token fields -> pack or pad -> batch -> optional worker processes.
The iterator is a Grain DatasetIterator: save `get_state()` with the model checkpoint.
"""

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxpt.data import chat, features
from jaxpt.data.sources import DataError, LoadedExamples, load_examples
from jaxpt.data.tokenizer import load_tokenizer


@dataclasses.dataclass
class DataStats:
    """Counts over this process's shard, for logging."""

    rows_read: int = 0
    skipped_invalid: int = 0
    truncated: int = 0  # kept, but cut to max_length
    dropped_too_long: int = 0  # overflow="drop"
    dropped_no_target: int = 0  # nothing left to train on (e.g. truncation cut the answer)
    examples: int = 0  # kept after fitting to max_length
    tokens: int = 0  # per epoch, in kept examples (both responses for pairs)
    target_tokens: int = 0  # per epoch, tokens that carry loss

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pipeline:
    """A Grain dataset, one live iterator over it, and the data counts.

    Iterate it (or `pipeline.iterator`) for batches; `get_state`/`set_state` checkpoint the
    iterator's position.
    """

    dataset: grain.IterDataset
    iterator: grain.DatasetIterator
    stats: DataStats
    skip_reasons: list[str]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        """Stop worker processes, if any."""
        if hasattr(self.iterator, "close"):
            self.iterator.close()


def build_sft_pipeline(
    source: str | Path | list[dict] | LoadedExamples,
    tokenizer: Any = None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    packing: bool = True,
    completion_only: bool = True,
    max_length: int | None = None,
    overflow: chat.Overflow = "truncate",
    skip_invalid: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Pipeline:
    """SFT batches from a file, hub dataset or rows (see module docstring for the format).

    `tokenizer` is a tokenizer or a name for `load_tokenizer` (None: the shipped one).
    `max_length` (default seq_len) caps each example; `overflow` "truncate" keeps its start,
    "drop" drops it. `num_epochs=None` repeats forever. Shards default to this JAX process.
    """
    _check_overflow(overflow)
    max_length = seq_len if max_length is None else max_length
    if not 2 <= max_length <= seq_len:
        raise ValueError(f"need 2 <= max_length <= seq_len, got {max_length} and {seq_len}")
    tokenizer = _tokenizer(tokenizer)
    loaded, rows, stats = _load_shard(source, "sft", split, skip_invalid, shard_index, shard_count)
    docs = []
    for row in rows:
        ids_l, mask_l = chat.tokenize_sft(row, tokenizer, completion_only)
        ids_l, mask_l, status = chat.fit_sft(ids_l, mask_l, max_length, overflow)
        if _count(stats, status):
            docs.append({"ids": ids_l, "mask": mask_l})
            stats.tokens += len(ids_l)
            stats.target_tokens += int(mask_l[1:].sum())
    dataset = _epochs(docs, loaded.source, seed, shuffle, num_epochs).map(features.document_row)
    iter_dataset = dataset.to_iter_dataset()
    if packing:
        lengths = {"input_ids": seq_len, "target_ids": seq_len, "loss_mask": seq_len}
        iter_dataset = grain.experimental.FirstFitPackIterDataset(
            iter_dataset,
            length_struct=lengths,
            num_packing_bins=batch_size,
            seed=seed,
            shuffle_bins=shuffle,
        ).map(features.rename_packed_row)
    else:
        iter_dataset = iter_dataset.map(functools.partial(features.pad_row, seq_len=seq_len))
    return _finish(iter_dataset, batch_size, num_workers, stats, loaded)


def build_preference_pipeline(
    source: str | Path | list[dict] | LoadedExamples,
    tokenizer: Any = None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    max_prompt_length: int | None = None,
    overflow: chat.Overflow = "truncate",
    skip_invalid: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Pipeline:
    """Preference-pair batches (reward modeling, DPO), one pair per row padded to seq_len.

    Too-long pairs keep the end of the prompt (at least `max_prompt_length`, default
    seq_len // 2, tokens of it) and cut responses on the right, or are dropped.
    """
    options = dict(locals())
    return _prompt_response_pipeline("preference", **options)


def build_unpaired_pipeline(
    source: str | Path | list[dict] | LoadedExamples,
    tokenizer: Any = None,
    **options,
) -> Pipeline:
    """Unpaired examples (KTO), one per row padded to seq_len, fitted as preference pairs
    are (the same keyword options as ``build_preference_pipeline``); each batch also
    carries its mismatched rows (``features.mismatched_rows``)."""
    return _prompt_response_pipeline("unpaired", source, tokenizer, **options)


def build_step_pipeline(
    source: str | Path | list[dict] | LoadedExamples,
    tokenizer: Any = None,
    *,
    separator: str = "\n",
    **options,
) -> Pipeline:
    """Step-labelled examples (process reward models), one per row padded to seq_len, each
    step followed by ``separator`` (the same keyword options as
    ``build_preference_pipeline``; too-long examples lose their last steps)."""
    return _prompt_response_pipeline("steps", source, tokenizer,
                                     tokenize_options={"separator": separator}, **options)


# What each prompt + response(s) kind tokenizes, which responses it fits, its row and batch maps.
_RESPONSE_KINDS = {
    "preference": (chat.tokenize_preference, ("chosen", "rejected"), features.preference_row,
                   None),
    "unpaired": (chat.tokenize_unpaired, ("completion",), features.unpaired_row,
                 lambda batch: {**batch, **features.mismatched_rows(batch)}),
    "steps": (chat.tokenize_steps, ("completion",), features.step_row, None),
}


def _prompt_response_pipeline(
    kind, source, tokenizer=None, *, seq_len, batch_size, seed=0, split="train",
    max_prompt_length=None, overflow="truncate", skip_invalid=False, num_epochs=None,
    shuffle=True, num_workers=0, shard_index=None, shard_count=None, tokenize_options=None,
) -> Pipeline:
    tokenize, sides, row_map, batch_map = _RESPONSE_KINDS[kind]
    tokenize = functools.partial(tokenize, **(tokenize_options or {}))
    _check_overflow(overflow)
    max_prompt_length = seq_len // 2 if max_prompt_length is None else max_prompt_length
    tokenizer = _tokenizer(tokenizer)
    loaded, rows, stats = _load_shard(source, kind, split, skip_invalid, shard_index, shard_count)
    items = []
    for row in rows:
        item, status = chat.fit_preference(tokenize(row, tokenizer), seq_len, max_prompt_length,
                                           overflow, sides=sides)
        if _count(stats, status):
            items.append({key: np.asarray(value) for key, value in item.items()})
            for side in sides:
                stats.tokens += len(item["prompt_ids"]) + len(item[f"{side}_ids"])
                stats.target_tokens += int(np.sum(item[f"{side}_mask"]))
    dataset = _epochs(items, loaded.source, seed, shuffle, num_epochs)
    row_fn = functools.partial(row_map, seq_len=seq_len)
    return _finish(dataset.map(row_fn).to_iter_dataset(), batch_size, num_workers, stats, loaded,
                   batch_map=batch_map)


def eval_batches(pipeline: Pipeline, num_batches: int | None = None) -> list[dict]:
    """Materialise a finite pipeline (build it with num_epochs=1, shuffle=False).

    With `num_batches`, returns exactly that many: extra batches are cut, and missing ones are
    all-padding batches (zero loss_mask / pair_mask), so every process runs the same number of
    eval steps.
    """
    batches = []
    for batch in pipeline:
        if num_batches is not None and len(batches) == num_batches:
            break
        batches.append(batch)
    pipeline.close()
    if num_batches is not None and batches:
        empty = {key: np.zeros_like(value) for key, value in batches[0].items()}
        batches += [empty] * (num_batches - len(batches))
    return batches


def _tokenizer(tokenizer: Any):
    return (
        load_tokenizer(tokenizer)
        if tokenizer is None or isinstance(tokenizer, (str, Path))
        else tokenizer
    )


def _check_overflow(overflow: str) -> None:
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")


def _load_shard(source, kind, split, skip_invalid, shard_index, shard_count):
    """Validated rows of this process's shard (every shard_count-th row) and fresh stats."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if not isinstance(source, LoadedExamples):
        source = load_examples(source, kind, split, skip_invalid)
    stats = DataStats(rows_read=source.num_read, skipped_invalid=source.num_skipped)
    # Sharding before tokenizing: each process only pays for its own rows.
    return source, source.rows[shard_index::shard_count], stats


def _count(stats: DataStats, status: chat.Status) -> bool:
    """Record a fit outcome; True when the example is kept."""
    if status == "truncated":
        stats.truncated += 1
    elif status != "ok":
        setattr(stats, status, getattr(stats, status) + 1)
        return False
    stats.examples += 1
    return True


def _epochs(items: list[dict], name: str, seed: int, shuffle: bool, num_epochs: int | None):
    if not items:
        raise DataError(f"{name}: no usable examples in this shard")
    dataset = grain.MapDataset.source(features.RaggedStore(items))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)  # a new order each epoch (seed + epoch)
    return dataset if num_epochs == 1 else dataset.repeat(num_epochs)


def _use_default_absl_flags() -> None:
    # Grain's worker start-up reads an absl flag; outside `absl.app.run` nothing has parsed
    # flags, which raises UnparsedFlagAccessError. Defaults are what we want.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(
    iter_dataset: grain.IterDataset,
    batch_size: int,
    num_workers: int,
    stats: DataStats,
    loaded: LoadedExamples,
    batch_map: Callable[[dict], dict] | None = None,
) -> Pipeline:
    # A short last batch (finite epochs only) is padded with zero rows to keep shapes fixed.
    batch_fn: Callable = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
    iter_dataset = iter_dataset.batch(batch_size, batch_fn=batch_fn)
    if batch_map is not None:
        iter_dataset = iter_dataset.map(batch_map)
    if num_workers > 0:
        _use_default_absl_flags()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers)
        )
    return Pipeline(iter_dataset, iter(iter_dataset), stats, loaded.skip_reasons)
