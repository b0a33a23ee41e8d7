"""altforge pipeline."""
