"""The package version, in a leaf module that anything (checkpoint metadata, the CLI, packaging) can import."""
__version__ = "0.1.0"
