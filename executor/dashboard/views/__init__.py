"""HTML pages, the JSON API and their shared helpers."""
