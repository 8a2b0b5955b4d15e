"""The language service. Packages, top to bottom (each may import only those below it):

- `server` (composition root, process lifecycle) and `cli` (every flag -> frozen configs);
- `openai_api` (the OpenAI HTTP app) and `grpc_api` (the internal gRPC API);
- `frontend` (messages -> engine requests: templates, images, the encode call, metrics);
- `parsers` (reasoning, tool calls) and `encoder` (the encode replicas' client);
- `errors` (what clients are told);
- `engine` (scheduler, KV blocks, sampler, step loop) and `runner` (the model on a device).

The layers are an import-linter contract in pyproject.toml."""
