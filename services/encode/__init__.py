"""The encode service: decodes and resizes images, runs the vision tower in batches across
requests, caches embeddings by content hash, and ships the packed tensor inline over gRPC or over
a torch.distributed link. `server` is its only importer of generated protobuf code.

May import `services.common` and `shared`; never `services.language`."""
