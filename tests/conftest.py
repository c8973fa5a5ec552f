"""Test-suite setup: this directory is on sys.path (as a conftest's directory), so test modules
and scripts share helpers such as `triton_interpreter`."""
