"""fitting room."""
