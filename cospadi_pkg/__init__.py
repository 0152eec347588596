"""CoSpaDi: streaming post-training compression with sparse dictionaries."""

__version__ = "0.1.0"
