"""Typed errors of the contract between the encode and language services."""


class WireFormatError(ValueError):
    """Received tensor bytes do not fit their header (size, order or dtype)."""


class LinkError(RuntimeError):
    """A torch.distributed link failed or timed out; it is closed and must be set up again."""


class ImageRefError(ValueError):
    """An image reference is malformed: no source, two sources, or a bad content hash."""


class IncompatibleEncoderError(RuntimeError):
    """An encode replica serves a different model contract than the language service expects."""
