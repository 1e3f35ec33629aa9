"""The steplm command line."""
from steplm.cli.main import build_parser, main  # noqa: F401
