"""The internal gRPC API (splitvl.language.v1 LanguageService) over the front end; `servicer`
is the only importer of its generated code.

May import `frontend`, `errors`, `engine` request types and `services.common`."""
