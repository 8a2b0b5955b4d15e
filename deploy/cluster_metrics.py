"""Prometheus samples of a compose cluster's containers, for the end-to-end checks.

A source is a URL (`http://127.0.0.1:8000/metrics`) or `CONTAINER:PORT`, read from inside the
container with `docker exec` (the replicas' ports are not published on the host).
"""

from __future__ import annotations

import re
import subprocess
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(source: str, timeout: float = 5.0) -> str:
    """The metrics text of one source."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout) as reply:  # noqa: S310 (local URL)
            return reply.read().decode()
    container, _, port = source.rpartition(":")
    code = (
        "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
        f"'http://127.0.0.1:{int(port)}/metrics', timeout={timeout}).read().decode())"
    )
    done = subprocess.run(
        ["docker", "exec", container, "python", "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout + 25,
    )
    if done.returncode != 0:
        raise OSError(f"metrics of {source}: {done.stderr.strip()[-300:]}")
    return done.stdout


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of one metric name."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match.group(1) == name:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            found.append((labels, float(match.group(3))))
    return found


def total(sources: list[str], name: str) -> float:
    """A metric summed over its label sets and over sources."""
    return sum(value for source in sources for _, value in samples(scrape(source), name))


def by_label(source: str, name: str, label: str) -> dict[str, float]:
    """A metric's values by one label (summed over the others)."""
    out: dict[str, float] = {}
    for labels, value in samples(scrape(source), name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out
