"""photometry room."""
