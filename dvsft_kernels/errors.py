"""Errors shared by the command-line subcommands (cli.py and the modules it dispatches to)."""


class UsageError(Exception):
    """Bad command-line input: printed as ``dvsft-kernels CMD: error: MSG``, exit status 2."""
