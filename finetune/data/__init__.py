"""Training data: the one JSON/JSONL reader (records), the data formats and their registry (formats), encoding (ids
and labels), loading and validation of training files, batching and packing (collator), preference pairs.

Import the modules themselves (finetune.data.records, .formats, .encoding, .loading, .validation, .collator).
"""
