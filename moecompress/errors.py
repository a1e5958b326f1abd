"""User-facing errors: one line, in the user's terms, never a traceback at the CLI."""


class MoeCompressError(Exception):
    """A problem with the user's input or options. The CLI prints `error: <message>` and exits 2."""


class CheckpointError(MoeCompressError):
    """A missing, corrupt or unsupported checkpoint."""


class PackedFormatError(MoeCompressError):
    """A packed checkpoint that is damaged, inconsistent or hostile."""
