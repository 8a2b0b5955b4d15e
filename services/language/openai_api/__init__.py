"""The OpenAI-compatible HTTP API: the FastAPI app and routes (`app`, `tokenize`), the request
bodies (`protocol`, `fields`, `constraints`), responses and streams (`responses`), the request
gate middleware (`gate`) and the error handlers (`http_errors`).

May import `frontend`, `parsers`, `errors`, `engine` request types and `services.common`."""
