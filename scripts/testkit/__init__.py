"""Tooling shared by tests, benchmarks and scripts: launching the services, writing random
checkpoints, building tokenizers. Nothing here is imported by the services themselves."""
