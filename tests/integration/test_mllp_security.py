"""The listener's gates over real sockets: TLS, mutual TLS, allow-lists, the connection cap, store unavailable -> AE."""

from __future__ import annotations

import socket
import sqlite3
import ssl
from pathlib import Path

import pytest
import trustme

from adapter.mllp.client import MllpClient
from tests.conftest import ack_fields
from tests.integration.test_delivery import adt


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a hospital client certificate."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("pas.rrk.example", common_name="pas.rrk.example")
    files = {
        "ca_file": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(files["ca_file"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    return {"ca": ca, "client": client, **files}


def client_context(pki: dict[str, object], with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki["ca"].configure_trust(context)  # type: ignore[attr-defined]
    if with_cert:
        pki["client"].configure_cert(context)  # type: ignore[attr-defined]
    return context


class TestTls:
    def test_tls_listener(self, serve, pki) -> None:  # type: ignore[no-untyped-def]
        process = serve(HOMEWARD_MLLP_TLS_CERT_FILE=str(pki["cert"]), HOMEWARD_MLLP_TLS_KEY_FILE=str(pki["key"]))
        with MllpClient("127.0.0.1", process.port, timeout=10, ssl_context=client_context(pki, False)) as client:
            assert ack_fields(client.send(adt("TLS-1")))["MSA"][1] == "AA"
        (listening,) = process.wait_for_log("mllp.listening")
        assert listening["tls"] is True
        # Plain MLLP on a TLS port gets nothing through, and the failed handshake is logged.
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as plain:
            plain.sendall(b"\x0b" + adt("PLAIN-1") + b"\x1c\r")
            with pytest.raises(OSError):
                if not plain.recv(1024):
                    raise ConnectionError("closed")
        process.wait_for_log("mllp.tls_refused")

    @pytest.mark.parametrize("workers", ["0", "2"])
    def test_mutual_tls_requires_a_client_certificate(self, serve, pki, workers: str) -> None:  # type: ignore[no-untyped-def]
        """Also with intake workers, which accept on the shared socket themselves and then hand over to TLS."""
        process = serve(
            HOMEWARD_MLLP_TLS_CERT_FILE=str(pki["cert"]),
            HOMEWARD_MLLP_TLS_KEY_FILE=str(pki["key"]),
            HOMEWARD_MLLP_TLS_CLIENT_CA_FILE=str(pki["ca_file"]),
            HOMEWARD_MLLP_WORKERS=workers,
        )
        with MllpClient("127.0.0.1", process.port, timeout=10, ssl_context=client_context(pki, True)) as client:
            assert ack_fields(client.send(adt("MTLS-1")))["MSA"][1] == "AA"
        connected = [line for line in process.wait_for_log("mllp.connected") if line.get("tls")]
        assert connected[0]["client_cn"] == "pas.rrk.example"
        without_cert = client_context(pki, False)
        with (
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
            MllpClient("127.0.0.1", process.port, timeout=10, ssl_context=without_cert) as client,
        ):
            client.send(adt("MTLS-2"))  # TLS 1.3: the refusal arrives on the first read
        (refused,) = process.wait_for_log("mllp.tls_refused")
        assert "CERTIFICATE" in refused["reason"].upper()


class TestAllowList:
    def test_facility_not_on_the_list_gets_ar_kept_and_logged(self, serve) -> None:  # type: ignore[no-untyped-def]
        process = serve(HOMEWARD_MLLP_ALLOW_FACILITIES="RXX,RYY")
        with MllpClient("127.0.0.1", process.port, timeout=10) as client:
            ack = ack_fields(client.send(adt("FAC-1")))  # MSH-4 is RRK
        assert ack["MSA"][1:3] == ["AR", "FAC-1"]
        assert "not on mllp.allow_facilities" in ack["ERR"][8]
        (refused,) = process.wait_for_log("message.refused")
        assert (refused["sending_facility"], refused["message_control_id"]) == ("RRK", "FAC-1")
        rows = (
            sqlite3.connect(process.env["HOMEWARD_STORE"])
            .execute("SELECT outcome, ack_code, sending_facility, message_control_id, reason FROM inbound")
            .fetchall()
        )
        assert rows[0][:4] == ("refused", "AR", "RRK", "FAC-1") and "allow_facilities" in rows[0][4]

    def test_network_not_on_the_list_gets_ar(self, serve) -> None:  # type: ignore[no-untyped-def]
        process = serve(HOMEWARD_MLLP_ALLOW_NETWORKS="10.20.0.0/16", HOMEWARD_MLLP_ALLOW_FACILITIES="RRK")
        with MllpClient("127.0.0.1", process.port, timeout=10) as client:
            ack = ack_fields(client.send(adt("NET-1")))
        assert ack["MSA"][1] == "AR" and "127.0.0.1 is not on mllp.allow_networks" in ack["ERR"][8]
        (refused,) = process.wait_for_log("message.refused")  # never a silent drop: a line an operator sees
        assert refused["peer"].startswith("127.0.0.1:") and refused["message_control_id"] == "NET-1"
        assert refused["ack_code"] == "AR" and "allow_networks" in refused["reason"]
        allowed = serve(
            HOMEWARD_MLLP_ALLOW_NETWORKS="10.20.0.0/16,127.0.0.0/8", HOMEWARD_STORE=str(Path(process.tmp) / "b.sqlite3")
        )
        with MllpClient("127.0.0.1", allowed.port, timeout=10) as client:
            assert ack_fields(client.send(adt("NET-2")))["MSA"][1] == "AA"


class TestBackPressure:
    def test_connections_over_the_cap_are_closed_and_logged(self, serve) -> None:  # type: ignore[no-untyped-def]
        process = serve(HOMEWARD_MLLP_MAX_CONNECTIONS="1")
        with MllpClient("127.0.0.1", process.port, timeout=10) as first:
            assert ack_fields(first.send(adt("CAP-1")))["MSA"][1] == "AA"
            with pytest.raises(ConnectionError), MllpClient("127.0.0.1", process.port, timeout=10) as second:
                second.send(adt("CAP-2"))
            process.wait_for_log("mllp.connection_refused")
            assert ack_fields(first.send(adt("CAP-3")))["MSA"][1] == "AA"  # the first connection is unaffected

    def test_store_unavailable_gives_ae_then_recovers(self, serve) -> None:  # type: ignore[no-untyped-def]
        """While another process holds the SQLite file locked, messages get AE 207 (resend later), not AA."""
        process = serve()
        with MllpClient("127.0.0.1", process.port, timeout=30) as client:
            locker = sqlite3.connect(process.env["HOMEWARD_STORE"], isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                ack = ack_fields(client.send(adt("LOCK-1")))
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            assert ack["MSA"][1] == "AE" and ack["ERR"][3].startswith("207")
            assert ack_fields(client.send(adt("LOCK-1")))["MSA"][1] == "AA"  # the resend is taken
