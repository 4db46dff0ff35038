"""Command-line tools that use a trained checkpoint: interactive/batch inference and export to a standalone model."""
