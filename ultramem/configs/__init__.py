"""Packaged training configs: `--config NAME` (e.g. `227m`, `debug.toml`) resolves here."""
