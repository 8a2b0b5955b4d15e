"""The contract both services speak.

Packed-embedding wire format and its inline chunk codec (`codec`), the packed layout itself
(`packed`), the torch.distributed point-to-point link (`link`), image descriptors and content
hashes (`images`), what an encode replica advertises (`info`), byte sizes and dtype names
(`units`), data: URLs (`dataurl`), the public-address URL fetcher (`fetch`), the internal token
and TLS files (`security`) and the typed errors (`errors`). Both services import this package;
neither imports the other. It imports nothing else of the project's.
"""
