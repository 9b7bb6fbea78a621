"""Data layer: readers for every input format, validation with quarantine, dedup, swap, folds, demo data."""
