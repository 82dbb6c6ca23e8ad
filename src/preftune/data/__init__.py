"""Preference data: rows in files → pairs → token ids → batches."""
