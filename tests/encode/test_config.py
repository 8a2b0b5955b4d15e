"""Command line to frozen config, and typed errors to gRPC status codes."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from services.common.errors import ConfigError
from services.encode.__main__ import build_parser, config_from_args
from services.encode.batcher import DeadlineExpiredError, VisionQueueFullError
from services.encode.encoder import InvalidImageError, NotCachedError
from services.encode.links import TicketError, UnknownLinkError
from services.encode.server import UnavailableError, status_for
from shared.wire.errors import LinkError


def test_command_line_builds_a_frozen_config(tiny_vl_dir):
    args = build_parser().parse_args(
        [
            "--model",
            str(tiny_vl_dir),
            "--port",
            "0",
            "--dtype",
            "bf16",
            "--cache-memory",
            "64MiB",
            "--max-batch-patches",
            "2048",
            "--metrics-port",
            "0",
            "--max-images-per-request",
            "4",
        ]
    )
    config = config_from_args(args)
    assert (config.dtype, config.cache_bytes, config.max_batch_patches) == (
        torch.bfloat16,
        64 << 20,
        2048,
    )
    assert config.metrics_port == 0 and config.limits.max_images_per_request == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


def test_bad_values_are_rejected(tiny_vl_dir, tmp_path):
    parser = build_parser()
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_args(parser.parse_args(["--model", str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match="chunk_bytes"):
        config_from_args(parser.parse_args(["--model", str(tiny_vl_dir), "--chunk-bytes", "8MiB"]))
    with pytest.raises(ConfigError, match="max_images_per_request"):
        argv = ["--model", str(tiny_vl_dir), "--max-images-per-request", "0"]
        config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidImageError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotCachedError("x"), grpc.StatusCode.NOT_FOUND),
        (TicketError("x"), grpc.StatusCode.NOT_FOUND),
        (UnknownLinkError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (VisionQueueFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExpiredError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (LinkError("x"), grpc.StatusCode.ABORTED),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(error, code):
    assert status_for(error) == code


def test_security_flags_build_the_config_and_bad_files_are_named(tiny_vl_dir, tmp_path):
    from shared.wire.errors import SecurityConfigError
    from tests.encode.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    parser = build_parser()
    base = ["--model", str(tiny_vl_dir)]
    config = config_from_args(
        parser.parse_args(
            [
                *base,
                "--internal-token-file",
                str(token_file),
                "--tls-cert",
                str(pki.server_cert),
                "--tls-key",
                str(pki.server_key),
                "--tls-ca",
                str(pki.ca),
            ]
        )
    )
    assert config.internal_token == "tok-123" and config.tls.ca == pki.ca.read_bytes()
    assert "tok-123" not in repr(config) and "PRIVATE" not in repr(config)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad = {
        "empty": (["--internal-token-file", str(empty)], "is empty"),
        "missing": (["--internal-token-file", str(tmp_path / "nope")], "cannot read"),
        "both": (["--internal-token", "a", "--internal-token-file", str(token_file)], "not both"),
        "spaces": (["--internal-token", "a b"], "printable ASCII"),
        "key_alone": (["--tls-key", str(pki.server_key)], "go together"),
        "cert_missing": (
            ["--tls-cert", str(tmp_path / "x.pem"), "--tls-key", str(pki.server_key)],
            "cannot read the certificate",
        ),
        "ca_alone": (["--tls-ca", str(pki.ca)], "needs --tls-cert"),
        "key_of_another_cert": (
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
            "not a usable certificate",
        ),
        "ca_not_pem": (
            [
                "--tls-cert",
                str(pki.server_cert),
                "--tls-key",
                str(pki.server_key),
                "--tls-ca",
                str(token_file),
            ],
            "not a PEM file",
        ),
    }
    for name, (args, message) in bad.items():
        with pytest.raises((SecurityConfigError, ConfigError), match=message):
            config_from_args(parser.parse_args([*base, *args]))
        assert name


def test_link_limit_is_resource_exhausted():
    from services.encode.links import LinkLimitError

    assert status_for(LinkLimitError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
