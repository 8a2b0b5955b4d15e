"""The client of the encode replicas: balancing, fail-over and the start-up handshake (`client`),
the gRPC adapter (`rpc`, the only importer of the encode service's generated code on this side),
inline and link delivery of the packed tensors (`inline`, `link`) and readiness (`probe`).

May import `shared` and gRPC; nothing of the front end, the engine or the APIs."""
