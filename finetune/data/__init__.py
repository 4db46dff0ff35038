"""Training data: encoding (ids and labels), loading and validation of training files, batching and packing."""

from .collator import RightPaddingCollator, first_fit_bins, pack_examples
from .encoding import (
    CONVERSATIONS,
    DATA_FORMATS,
    IGNORE_INDEX,
    INPUT_OUTPUT,
    encode_conversation,
    encode_input_output,
)
from .loading import EncodingLimits, TrainingData, load_training_data
from .validation import DataProblem, DataSummary, DataValidationError, print_token_labels, read_source_records

__all__ = [
    "CONVERSATIONS",
    "DATA_FORMATS",
    "IGNORE_INDEX",
    "INPUT_OUTPUT",
    "DataProblem",
    "DataSummary",
    "DataValidationError",
    "EncodingLimits",
    "RightPaddingCollator",
    "TrainingData",
    "encode_conversation",
    "encode_input_output",
    "first_fit_bins",
    "load_training_data",
    "pack_examples",
    "print_token_labels",
    "read_source_records",
]
