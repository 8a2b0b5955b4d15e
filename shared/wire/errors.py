"""Typed errors of the contract between the encode and language services."""


class WireFormatError(ValueError):
    """Received tensor bytes do not fit their header (size, order or dtype)."""


class LinkError(RuntimeError):
    """A torch.distributed link failed or timed out; it is closed and must be set up again."""


class LinkRefusedError(LinkError):
    """A peer tried to join a link without proving it holds the link's secret (or the link was
    already claimed by another peer); the link is closed and a new one must be opened."""


class ImageRefError(ValueError):
    """An image reference is malformed: no source, two sources, or a bad content hash."""


class IncompatibleEncoderError(RuntimeError):
    """An encode replica serves a different model contract than the language service expects."""


class SecurityConfigError(ValueError):
    """An internal token or TLS file given at start-up is missing, empty or unreadable."""
