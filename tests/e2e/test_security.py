"""TLS, mutual TLS and the bearer token, end to end, with certificates made for the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.clients import AsyncClient, ClientOptions, Retry, SluiceError
from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import add_digits, sluice

PIXELS = np.zeros((1, 64), np.float32)
NO_RETRY = Retry(attempts=1)


def _cert(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca, ca_key = _cert("sluice test CA", None, ca=True)
    server, server_key = _cert("localhost", (ca.subject, ca_key), server=True)
    client, client_key = _cert("a client", (ca.subject, ca_key))
    files = {
        "ca": _pem(ca), "server": _pem(server), "server_key": _key_pem(server_key),
        "client": _pem(client), "client_key": _key_pem(client_key),
    }  # fmt: skip
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


async def _serve(repo: Path, **kw: object) -> SluiceServer:
    add_digits(repo)
    server = SluiceServer(ServerSettings(model_repository=repo, port=0, metrics_port=0, http_port=-1, **kw))  # type: ignore[arg-type]
    await server.start()
    await server.loaded()
    return server


async def test_tls_and_mutual_tls(repo: Path, pki: dict[str, Path]) -> None:
    server = await _serve(repo, tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    try:
        mutual = ClientOptions(
            tls=True, root_certificates=pki["ca"].read_bytes(), certificate_chain=pki["client"].read_bytes(),
            private_key=pki["client_key"].read_bytes(), retry=NO_RETRY, timeout=10,
        )  # fmt: skip
        async with AsyncClient(server.address, mutual) as client:
            assert (await client.predict("digits", pixels=PIXELS))["label"].shape == (1,)

        no_client_cert = ClientOptions(
            tls=True, root_certificates=pki["ca"].read_bytes(), retry=NO_RETRY, timeout=10
        )
        async with AsyncClient(server.address, no_client_cert) as client:
            with pytest.raises(SluiceError) as info:
                await client.predict("digits", pixels=PIXELS)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

        async with AsyncClient(server.address, ClientOptions(retry=NO_RETRY, timeout=10)) as plaintext:
            with pytest.raises(SluiceError):
                await plaintext.predict("digits", pixels=PIXELS)
    finally:
        await server.stop(0)


async def test_the_command_line_client_speaks_tls_and_mutual_tls(repo: Path, pki: dict[str, Path]) -> None:
    server = await _serve(repo, tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    target = ["--target", server.address, "--timeout", "10"]
    mutual = ["--ca", str(pki["ca"]), "--cert", str(pki["client"]), "--key", str(pki["client_key"])]
    try:
        pixels = "pixels=" + json.dumps([[0] * 64])
        code, out, err = await sluice("predict", "digits", "-i", pixels, *target, *mutual, "--json")
        assert code == 0, err
        assert len(json.loads(out)["label"]) == 1
        code, out, err = await sluice("health", *target, *mutual)
        assert code == 0, err
        assert "digits" in out
        code, _, err = await sluice("unload", "digits", *target, *mutual)  # reaches the server over TLS
        assert code == 1
        assert "FAILED_PRECONDITION" in err

        code, _, err = await sluice("health", *target, "--ca", str(pki["ca"]))  # no client certificate
        assert code == 1
        assert "UNAVAILABLE" in err
        assert "over TLS, check that --ca trusts its certificate" in err
        code, _, err = await sluice("health", *target, "--ca", str(pki["ca"]), "--cert", str(pki["client"]))
        assert code == 2
        assert "--cert and --key go together" in err
        code, _, err = await sluice("health", *target, "--ca", str(pki["ca"]) + ".missing")
        assert code == 2
        assert "--ca" in err
        assert "No such file" in err
    finally:
        await server.stop(0)


async def test_bearer_token_guards_every_service_but_health(repo: Path) -> None:
    server = await _serve(repo, auth_token="s3cret-token")
    try:
        async with AsyncClient(server.address, ClientOptions(token="s3cret-token", retry=NO_RETRY)) as good:
            assert (await good.predict("digits", pixels=PIXELS))["label"].shape == (1,)
            assert (await good.health()).models[0].name == "digits"
        for token in (None, "wrong", "s3cret-token-but-longer"):
            async with AsyncClient(server.address, ClientOptions(token=token, retry=NO_RETRY)) as bad:
                with pytest.raises(SluiceError) as info:
                    await bad.predict("digits", pixels=PIXELS)
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in info.value.message
                with pytest.raises(SluiceError) as stream_info:
                    [r async for r in bad.stream([])]
                assert stream_info.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Refused calls never reached a model: only the one good prediction ran.
        assert server.metrics.model("digits", 1).batch_rows.counts[0] == 1
        async with grpc.aio.insecure_channel(server.address) as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


def test_tls_settings_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerSettings(tls_cert=tmp_path / "cert.pem")
