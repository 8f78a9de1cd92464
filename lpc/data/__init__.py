"""Preference data: rows from files or ``datasets`` (``rows``), tokenised pairs, batches and the training order
(``batching``), the built-in synthetic data with known ground truth (``synthetic``) and the tiny model's locally
trained tokenizers (``tokenizer``)."""

from .batching import (BATCH_LAYOUTS, IGNORE_INDEX, EpochSampler, IndexView, PreferenceCollator, PreferenceDataset,
                       TokenizedPair, UnknownTokenShare, UserGroupedSampler, batches, to_device,
                       truncate_pair)
from .rows import (REASONS, DataError, LoadStats, MalformedRow, assign_source_ids, assign_user_ids, load_jsonl,
                   load_preference_rows, looks_local, normalize_row)

__all__ = ["BATCH_LAYOUTS", "IGNORE_INDEX",
           "EpochSampler", "IndexView", "PreferenceCollator", "PreferenceDataset", "TokenizedPair",
           "UnknownTokenShare", "UserGroupedSampler", "batches", "to_device", "truncate_pair", "REASONS", "DataError",
           "LoadStats", "MalformedRow", "assign_source_ids", "assign_user_ids", "load_jsonl", "load_preference_rows",
           "looks_local", "normalize_row"]
