"""The front end both APIs share: chat templates and prompts (`prompt`), image loading and limits
(`images`, `image_policy`), pad expansion (`pads`), the pipeline that turns messages into engine
requests and streams outputs (`pipeline`), admission and drain (`serving`), metrics, and the
engine and encoder as it sees them (`ports`).

May import `parsers`, `encoder`, `errors`, `engine` and `shared`; knows nothing of HTTP or gRPC."""
