"""Benchmarks, each run as `python -m bench.<name>` with a baseline or a peer side by side;
`common` holds what they share (shapes, random models, sync, results)."""
