"""altforge training."""
