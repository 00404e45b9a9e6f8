"""Joining a Ray cluster (issue 23): an unreachable ``--address`` is one typed line within seconds, never Ray's
minutes of retries, and a malformed one says what an address looks like."""

from __future__ import annotations

import socket

import pytest
from hostile import DEMO, one_line_error, run_cli

from far_sdk.cli.main import main
from far_sdk.errors import EXIT_RUNTIME, EXIT_USAGE, BackendUnavailableError, InvalidArgumentError
from far_sdk.scale.cluster import head_endpoint, init_ray


class NeverCalledRay:
    """A ray module whose init would hang: the check must refuse before reaching it."""

    def init(self, **kwargs):
        raise AssertionError(f"ray.init reached with {kwargs}")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "address,want",
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("ray://head.example:10001", ("head.example", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
        ("local", None),
    ],
)
def test_a_cluster_address_names_the_head_it_connects_to(address, want):
    assert head_endpoint(address) == want


@pytest.mark.parametrize("address", ["10.0.0.5", "host:", ":6379", "host:0", "host:70000", "host:http"])
def test_a_malformed_address_says_what_an_address_looks_like(address):
    with pytest.raises(InvalidArgumentError, match="is not a Ray cluster address: give HOST:PORT"):
        init_ray(NeverCalledRay(), address)


def test_an_unreachable_address_is_refused_before_ray_retries():
    port = closed_port()
    with pytest.raises(BackendUnavailableError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        init_ray(NeverCalledRay(), f"127.0.0.1:{port}")


def test_far_generate_dataset_with_an_unreachable_address_is_one_line(tmp_path):
    port = closed_port()
    args = ["generate-dataset", str(DEMO), "--out", str(tmp_path / "d"), "--num-images", "2", "--inner-steps", "1"]
    rc, _, err = run_cli(main, [*args, "--workers", "1", "--address", f"127.0.0.1:{port}", "--no-progress"])
    assert rc == EXIT_RUNTIME and one_line_error(err) and "cannot reach the Ray cluster" in err, err
    rc, _, err = run_cli(main, [*args, "--workers", "1", "--address", "nowhere", "--no-progress"])
    assert rc == EXIT_USAGE and one_line_error(err) and "--address 'nowhere' is not a Ray cluster address" in err, err
