"""The contract both services speak.

Packed-embedding wire format and its inline chunk codec (`codec`), the torch.distributed
point-to-point link (`link`), image descriptors and content hashes (`images`), what an encode
replica advertises (`info`), byte sizes and dtype names (`units`), data: URLs (`dataurl`) and
the typed errors (`errors`). Both services import this package; neither imports the other.
"""
