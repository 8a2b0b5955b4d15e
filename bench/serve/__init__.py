"""An OpenAI-compatible serving load generator: `python -m bench.serve --help`."""
