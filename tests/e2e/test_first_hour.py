"""What a new user meets in the first hour (issue 11): each mistake gets one line naming the fix."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sluice.clients import AsyncClient, SluiceError, build_request
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import add_digits, add_model, save, scrape, serving, sluice

ROWS = np.random.default_rng(11).integers(0, 17, size=(3, 64))


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port with a listener on it, as another server would hold it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- 1 and 5: help and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["predict"], ["health"], ["models"]])
async def test_every_command_has_help(command: list[str]) -> None:
    code, out, err = await sluice(*command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: sluice {' '.join(command)}".rstrip())


async def test_serve_help_lists_every_setting() -> None:
    code, out, err = await sluice("serve", "--help")
    assert code == 0, err
    flat = " ".join(out.split())
    for name in ServerSettings.model_fields:
        if name != "model_repository":  # the positional argument
            assert f"--{name.replace('_', '-')}" in flat
    assert "about 10% more requests/s" in flat


@pytest.mark.parametrize("command", ["serve", "predict digits", "health", "models"])
async def test_unknown_flag_shows_the_subcommands_usage(command: str) -> None:
    code, _, err = await sluice(*command.split(), "--nope")
    command = command.split()[0]
    assert code == 2
    assert err.startswith(f"usage: sluice {command} ")
    assert err.rstrip().endswith(f"sluice {command}: error: unrecognized arguments: --nope")


# -- 2 and 3: sluice predict ---------------------------------------------------------------------------


async def test_predict_casts_an_npy_file_when_the_cast_is_exact(server: SluiceServer, tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", ROWS.astype(np.float64))
    code, out, err = await sluice(
        "predict", "digits", "-i", "pixels=images.npy", "--target", server.address, "--json", cwd=tmp_path
    )
    assert code == 0, err
    async with AsyncClient(server.address) as client:
        expected = (await client.predict("digits", pixels=ROWS.astype(np.float32)))["label"]
    assert json.loads(out)["label"] == expected.tolist()

    np.save(tmp_path / "fractions.npy", np.full((1, 64), 0.1))
    code, _, err = await sluice(
        "predict", "digits", "-i", "pixels=fractions.npy", "--target", server.address, cwd=tmp_path
    )
    assert code == 2
    assert err == (
        "sluice predict: --input pixels=fractions.npy: the model takes float32 and the file holds float64 "
        "values that float32 cannot hold exactly; save the array as float32 "
        '(np.save(path, array.astype("float32"))) to send it\n'
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"a": 1}', "--input pixels: expected a JSON array (nested lists), got a JSON object"),
        ('[[1, {"a": 1}]]', "--input pixels: expected numbers (the model takes FP32), got a JSON object at [0][1]"),
        ("[[1, 2], [3]]", "--input pixels: the nested lists are ragged: [1] has shape [1], [0] has shape [2]; every row needs the same shape"),
        ("[[0, 3, ", "--input pixels=[[0, 3, : not valid JSON (Expecting value at line 1 column 9); expected a JSON array such as [[0, 3]], or a file: pixels=FILE.npy, pixels=@FILE.json or pixels=@FILE"),
        ("rows.json", "--input pixels=rows.json: not JSON, but a file of that name exists: write pixels=@rows.json"),
        ("@missing.json", "--input pixels=@missing.json: no such file"),
        ("missing.npy", "--input pixels=missing.npy: no such file"),
    ],
    ids=["object", "object-inside", "ragged", "truncated", "forgotten-at", "no-json-file", "no-npy-file"],
)  # fmt: skip
async def test_predict_input_mistakes_name_the_input_and_the_fix(
    server: SluiceServer, tmp_path: Path, value: str, message: str
) -> None:
    (tmp_path / "rows.json").write_text("[[0]]")
    code, out, err = await sluice(
        "predict", "digits", "-i", f"pixels={value}", "--target", server.address, cwd=tmp_path
    )
    assert (code, out, err) == (2, "", f"sluice predict: {message}\n")


async def test_predict_without_a_server_says_to_start_one() -> None:
    code, _, err = await sluice("predict", "digits", "-i", "pixels=[[0]]", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")  # fmt: skip
    assert code == 1
    assert err.startswith("sluice predict: UNAVAILABLE: ")
    assert "Start one with `sluice serve`, or point --target or SLUICE_TARGET at it)" in err


# -- 4: ports and certificates -------------------------------------------------------------------------


async def test_a_taken_grpc_port_is_one_line() -> None:
    with taken_port() as port:
        code, out, err = await sluice("serve", "--port", str(port), "--metrics-port", "-1")
    assert (code, out) == (2, "")
    assert err == (
        f"sluice serve: port={port}: 127.0.0.1:{port} is already in use; stop what listens there or choose "
        "another with --port (SLUICE_PORT; 0 picks a free one)\n"
    )


async def test_a_taken_metrics_port_is_one_line() -> None:
    with taken_port() as port:
        code, out, err = await sluice("serve", "--port", "0", "--metrics-port", str(port))
    assert (code, out) == (2, "")
    assert err == (
        f"sluice serve: metrics_port={port}: 127.0.0.1:{port} is already in use; stop what listens there or "
        "choose another with --metrics-port (SLUICE_METRICS_PORT; 0 picks a free one, -1 turns metrics off)\n"
    )


async def test_one_port_for_two_doors_is_refused_even_with_workers() -> None:
    # Under --workers every socket shares its port (SO_REUSEPORT): without this check the kernel would hand
    # half the connections to the wrong door.
    port = free_port()
    code, out, err = await sluice(
        "serve", "--port", str(port), "--http-port", str(port), "--metrics-port", "-1", "--workers", "2"
    )
    assert (code, out) == (2, "")
    assert err == (
        f"sluice serve: http_port={port} is also the gRPC port; choose another with --http-port (0 picks a "
        "free one, -1 turns the REST port off)\n"
    )
    code, out, err = await sluice(
        "serve", "--port", "0", "--http-port", str(port), "--metrics-port", str(port)
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"sluice serve: metrics_port={port} is also the REST port")


async def test_a_missing_repository_or_socket_directory_is_one_line(tmp_path: Path) -> None:
    code, out, err = await sluice("serve", str(tmp_path / "modles"), "--port", "0", "--metrics-port", "-1")
    assert (code, out) == (2, "")
    assert err == (
        f"sluice serve: model_repository={tmp_path / 'modles'}: not a directory; give the directory that holds "
        "your models (<repository>/<model>/<version>/model.onnx), or leave it out to serve the bundled examples\n"
    )
    socket_path = tmp_path / "gone" / "sluice.sock"
    code, out, err = await sluice(
        "serve", "--port", "0", "--metrics-port", "-1", "--unix-socket", str(socket_path)
    )
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        f"sluice serve: unix_socket={socket_path}: cannot bind it; check that its directory exists and is "
        "writable, and remove a socket file left by a server that is gone"
    )
    assert "Traceback" not in err


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_certificate_mistakes_are_one_line(tmp_path: Path) -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "server.pem").write_bytes(_self_signed(key))
    (tmp_path / "server.key").write_bytes(_key_pem(key))
    (tmp_path / "other.key").write_bytes(_key_pem(other))
    (tmp_path / "server.der").write_bytes(b"\x30\x82\x01\x0a not pem")
    base = ("serve", "--port", "0", "--metrics-port", "-1")

    code, _, err = await sluice(*base, "--tls-cert", "server.der", "--tls-key", "server.key", cwd=tmp_path)
    assert (code, err) == (2,
        "sluice serve: tls_cert=server.der: not a PEM certificate (no '-----BEGIN ...CERTIFICATE-----' line); "
        "give the PEM file, or convert it (openssl x509 -inform der -in FILE -out FILE.pem)\n")  # fmt: skip

    code, _, err = await sluice(*base, "--tls-cert", "server.pem", "--tls-key", "other.key", cwd=tmp_path)
    assert (code, err) == (2,
        "sluice serve: tls_key=other.key: does not match the certificate in tls_cert=server.pem; give the key "
        "the certificate was issued for\n")  # fmt: skip

    code, _, err = await sluice(*base, "--tls-cert", "server.pem", "--tls-key", "gone.key", cwd=tmp_path)
    assert (code, err) == (2, "sluice serve: tls_key=gone.key: cannot read it (No such file or directory)\n")


# -- 6 and 7: model repository mistakes ----------------------------------------------------------------


async def _reasons(repo: Path) -> dict[str, str]:
    """Why each model failed, as Health tells a caller (the model's reason, else its first version's)."""
    async with serving(repo) as (server, _), AsyncClient(server.address) as client:
        health = await client.health()
    return {m.name: m.reason or (m.versions[0].reason if m.versions else "") for m in health.models}


async def test_model_mistakes_say_what_was_meant(repo: Path) -> None:
    add_digits(repo, "typo")
    (repo / "typo" / "config.toml").write_text("[batching]\nmax_batch_szie = 8\n")
    add_digits(repo, "untabled")
    (repo / "untabled" / "config.toml").write_text("max_batch_size = 8\n")
    save(add_model(1.0), repo / "linear" / "1" / "linear.onnx")
    reasons = await _reasons(repo)
    assert reasons["typo"].endswith(
        "config.toml: field 'batching.max_batch_szie': Extra inputs are not permitted (got 8); "
        "did you mean 'max_batch_size'?"
    )
    assert reasons["untabled"].endswith(
        "config.toml: field 'max_batch_size': Extra inputs are not permitted (got 8); "
        "did you mean 'max_batch_size' under [batching]?"
    )
    assert reasons["linear"].endswith(
        "1/model.onnx: no such file; the directory has linear.onnx: rename it to model.onnx, or name it in "
        'config.toml: runtime = { name = "onnx", file = "linear.onnx" }'
    )


async def test_a_zipmap_output_says_how_to_export_without_it(repo: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    (repo / "iris" / "1").mkdir(parents=True)
    (repo / "iris" / "1" / "model.onnx").write_bytes(to_onnx(model, x[:1]).SerializeToString())
    reasons = await _reasons(repo)
    assert reasons["iris"].endswith(
        "model.onnx: output 'output_probability' has type seq(map(int64,tensor(float))), which Sluice cannot "
        "serve; this is the ZipMap of a scikit-learn classifier: export it without one, "
        "skl2onnx.to_onnx(model, X, options={id(model): {'zipmap': False}}), to get a probabilities tensor"
    )


# -- 8 and 9: the Python client ------------------------------------------------------------------------


async def test_stream_gives_requests_their_position_as_id(server: SluiceServer) -> None:
    pixels = ROWS.astype(np.float32)
    requests = [build_request("digits", {"pixels": pixels[i : i + 1]}) for i in range(3)]
    requests.append(build_request("digits", {"pixels": pixels[:1]}, request_id="mine"))
    async with AsyncClient(server.address) as client:
        answers = {r.id: r async for r in client.stream(requests)}
        expected = (await client.predict("digits", pixels=pixels))["label"]
    assert sorted(answers) == ["0", "1", "2", "mine"]
    assert [r.id for r in requests] == ["0", "1", "2", "mine"]
    for i in range(3):
        outputs = answers[str(i)].outputs
        assert outputs is not None
        assert outputs["label"][0] == expected[i]


@asynccontextmanager
async def _running(settings: ServerSettings) -> AsyncIterator[SluiceServer]:
    server = SluiceServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(5)


async def test_default_retries_ride_through_a_restart(repo: Path) -> None:
    save(add_model(1.0), repo / "adder" / "1" / "model.onnx")
    port = free_port()
    settings = ServerSettings(model_repository=repo, port=port, metrics_port=-1, grace_period_s=5)
    x = np.zeros((1, 4), np.float32)
    results: dict[str, str] = {}  # call id -> final status
    spans: dict[str, tuple[str, str]] = {}  # call id -> the server's phase when it started and ended
    phase = "first"
    answered = asyncio.Event()

    async def answers(count: int) -> None:
        while len(results) < count:
            answered.clear()
            await answered.wait()

    async def caller(n: int) -> None:
        async with AsyncClient(f"127.0.0.1:{port}") as client:  # the default ClientOptions and Retry
            for i in range(5000):
                call, started = f"{n}-{i}", phase
                try:
                    await client.predict("adder", x=x, timeout=30)
                    results[call] = "OK"
                except SluiceError as exc:
                    results[call] = f"{exc.code.name}: {exc.message}"
                spans[call] = (started, phase)
                answered.set()
                if phase == "done":
                    return

    async with asyncio.timeout(60):
        async with _running(settings) as first:
            await first.loaded()
            callers = [asyncio.create_task(caller(n)) for n in range(4)]
            await answers(20)  # every caller is under way
            phase = "stopping"
        phase = "down"  # the first server has drained and closed its port
        await asyncio.sleep(0.5)
        async with _running(settings) as second:
            await second.loaded()
            phase = "second"
            await answers(len(results) + 20)
            phase = "done"
            await asyncio.gather(*callers)

    failed = {call: status for call, status in results.items() if status != "OK"}
    assert failed == {}
    assert len(results) == len(spans)
    before = ("first", "stopping")
    rode_through = [call for call, (start, end) in spans.items() if start in before and end not in before]
    assert rode_through, "no call was in flight across the restart"


# -- 10: metrics ---------------------------------------------------------------------------------------


async def test_unknown_models_share_one_label_and_every_reason_starts_at_zero(repo: Path) -> None:
    add_digits(repo)
    async with serving(repo, metrics=True) as (server, _):
        async with AsyncClient(server.address) as client:
            for name in ("nope", "another"):
                with pytest.raises(SluiceError):
                    await client.predict(name, pixels=ROWS[:1].astype(np.float32))
        metrics = scrape(server)
    assert (
        metrics['sluice_requests_total{code="NOT_FOUND",method="Predict",model="_unknown",version=""}'] == 2
    )
    assert not [k for k in metrics if 'model=""' in k]
    for reason in ("queue_full", "too_large", "closed"):
        assert metrics[f'sluice_rejected_total{{model="digits",reason="{reason}",version="1"}}'] == 0
    for reason in ("deadline", "cancelled", "shutdown"):
        assert metrics[f'sluice_dropped_total{{model="digits",reason="{reason}",version="1"}}'] == 0
