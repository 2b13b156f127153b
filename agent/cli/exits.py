"""The command line's exit codes, and the error that ends it with a usage mistake."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input found after argument parsing (an unreadable request file, say); exits 2."""
