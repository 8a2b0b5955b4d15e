"""The two services: `encode` (the vision tower behind gRPC) and `language` (the language model
behind OpenAI HTTP and gRPC), plus `common`, what both use. Neither service imports the other;
both import `shared`, never the tooling (`bench`, `scripts`, `tests`)."""
