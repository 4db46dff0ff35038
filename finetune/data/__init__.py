"""Training data: encoding (ids and labels), loading and validation of training files, batching and packing.

Import the modules themselves (finetune.data.encoding, .loading, .validation, .collator).
"""
