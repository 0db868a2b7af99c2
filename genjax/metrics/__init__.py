"""Sample-quality metrics, each by a published protocol."""
