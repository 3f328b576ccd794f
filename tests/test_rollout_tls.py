"""Rollouts over Dask's TLS security: the plan's [tls] table and the CLI's --tls-* options.

Certificates are made here with ``cryptography`` (a CA, then one certificate each for the scheduler, the
workers and the orchestrator). A bad TLS setting is one line naming the field, exit 2, before anything is
recorded; a rollout over a TLS-only LocalCluster patches real Wine processes and is aborted again.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.security import Security

from hotpatch.apply.agent import AgentClient
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.cli.commands import main
from hotpatch.errors import PlanError
from hotpatch.package.format import save
from hotpatch.rollout.executor_dask import local_cluster
from hotpatch.rollout.plan import load_plan
from hotpatch.rollout.state import RolloutStore
from tests.support.hosts import Host
from tests.support.live import CALLS, wait_values
from tests.support.packages import simple

PARTIES = ("scheduler", "worker", "orchestrator")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(where: Path, ca_name: str = "hotpatch-test-ca") -> dict[str, Path]:
    """A CA and a certificate + key per party, as PEM files: {"ca_file", "<party>.pem", "<party>.key"}."""
    where.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca_file": where / "ca.pem"}
    files["ca_file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for party in PARTIES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(party)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[f"{party}.pem"] = where / f"{party}.pem"
        files[f"{party}.key"] = where / f"{party}.key"
        files[f"{party}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{party}.key"].write_bytes(_pem_key(key))
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_plan(where: Path, tls: dict[str, str], hosts: str = '{name = "a", pids = [42]}',
             scheduler: str = "tls://127.0.0.1:1") -> Path:
    lines = "\n".join(f'{key} = "{value}"' for key, value in tls.items())
    path = where / "plan.toml"
    path.write_text(f'name = "tls"\n[package]\npath = "fix.hpk"\nallow_unsigned = true\n'
                    f'[inventory]\nscheduler = "{scheduler}"\nhosts = [{hosts}]\n'
                    f'[[waves]]\nname = "canary"\ncount = 1\n[[waves]]\nname = "rest"\nrest = true\n'
                    f'[health]\nsoak = "0s"\n[tls]\n{lines}\n')
    return path


def orchestrator_tls(pki: dict[str, Path]) -> dict[str, str]:
    return {"ca_file": str(pki["ca_file"]), "cert": str(pki["orchestrator.pem"]), "key": str(pki["orchestrator.key"])}


# --------------------------------------------------------------------------
# Bad TLS settings: one line naming the field, exit 2, nothing recorded
# --------------------------------------------------------------------------


def test_plan_tls_paths_are_relative_to_the_plan_and_give_an_encrypted_client_security(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    for name in ("ca.pem", "orchestrator.pem", "orchestrator.key"):
        (tmp_path / name).write_bytes(pki[name if name != "ca.pem" else "ca_file"].read_bytes())
    plan = load_plan(tls_plan(tmp_path, {"ca_file": "ca.pem", "cert": "orchestrator.pem", "key": "orchestrator.key"}))
    assert plan.tls is not None and plan.tls.cert == tmp_path / "orchestrator.pem"
    security = plan.tls.security()
    assert security.require_encryption and security.tls_client_cert == str(tmp_path / "orchestrator.pem")
    assert security.get_connection_args("client")["ssl_context"] is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cert": "missing.pem"}, r"^tls.cert: cannot read .*missing.pem: No such file or directory$"),
        ({"ca_file": "."}, r"^tls.ca_file: cannot read .*: Is a directory$"),
        ({"key": "plan.toml"}, r"^tls.key: .*plan.toml is not a PEM file$"),
        ({"key": "worker.key"}, r"^tls.cert: .*orchestrator.pem and .*worker.key are not a certificate and its key"),
        ({"ca_file": "worker.key"}, r"^tls.ca_file: .*worker.key holds no CA certificate"),
        ({"key": None}, r"^tls.key: missing \(TLS needs the CA file, a certificate and its key\)$"),
        ({"certificate": "x.pem"}, r"^tls.certificate: unknown field$"),
    ],
)
def test_bad_tls_setting_in_the_plan_is_named(
    tmp_path: Path, pki: dict[str, Path], change: dict[str, str | None], message: str
) -> None:
    (tmp_path / "worker.key").write_bytes(pki["worker.key"].read_bytes())
    settings = {**orchestrator_tls(pki), **change}
    plan = tls_plan(tmp_path, {k: v for k, v in settings.items() if v is not None})
    with pytest.raises(PlanError, match=message):
        load_plan(plan)


def test_cli_refuses_a_missing_tls_file_with_one_line_exit_2_and_records_nothing(
    tmp_path: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "db.sqlite"
    plan = tls_plan(tmp_path, {**orchestrator_tls(pki), "cert": str(tmp_path / "gone.pem")})
    assert main(["rollout", str(plan), "--db", str(db), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hotpatch: error: tls.cert: cannot read ") and "gone.pem" in err
    # the CLI's options are checked the same way, before the plan is even read
    args = ["--tls-ca-file", str(pki["ca_file"]), "--tls-cert", str(pki["orchestrator.pem"]),
            "--tls-key", str(tmp_path / "nope.key")]
    assert main(["rollout", str(plan), "--db", str(db), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hotpatch: error: --tls-key: cannot read ")
    assert main(["rollout", "resume", "tls", "--db", str(db), *args[:2]]) == 2
    assert capsys.readouterr().err == ("hotpatch: error: --tls-cert: missing "
                                       "(TLS needs the CA file, a certificate and its key)\n")
    assert not db.exists()


# --------------------------------------------------------------------------
# A rollout over a TLS-only cluster (Wine processes, the real agent)
# --------------------------------------------------------------------------


@pytest.fixture
def tls_cluster(pki: dict[str, Path], tmp_path: Path, wine_prefix: Path, agent_exe: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A cluster whose scheduler and in-process workers speak TLS only, each with its own certificate."""
    state = tmp_path / "state"
    monkeypatch.setenv("HOTPATCH_STATE", str(state))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))
    security = Security(tls_ca_file=str(pki["ca_file"]), require_encryption=True,
                        tls_scheduler_cert=str(pki["scheduler.pem"]), tls_scheduler_key=str(pki["scheduler.key"]),
                        tls_worker_cert=str(pki["worker.pem"]), tls_worker_key=str(pki["worker.key"]),
                        tls_client_cert=str(pki["worker.pem"]), tls_client_key=str(pki["worker.key"]))
    with local_cluster(["a", "b"], processes=False, threads=1, security=security) as cluster:
        yield cluster.scheduler_address, state


@pytest.mark.cluster
@pytest.mark.slow
def test_rollout_over_a_tls_cluster_patches_and_aborts_with_the_plans_certificates(
    tmp_path: Path, pki: dict[str, Path], dll: Path, wine_prefix: Path, agent: AgentClient,
    tls_cluster: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = tls_cluster
    assert address.startswith("tls://")
    # a client without certificates cannot even talk to this scheduler
    with pytest.raises(TypeError, match="TLS expects a `ssl_context` argument"):
        Client(address, timeout="5s")
    save(simple(dll), tmp_path / "fix.hpk")
    hosts = {name: Host(wine_prefix, dll, CALLS, threads=2) for name in "ab"}
    try:
        inventory = ", ".join(f'{{name = "{n}", pids = [{h.pid}]}}' for n, h in hosts.items())
        plan = tls_plan(tmp_path, orchestrator_tls(pki), hosts=inventory, scheduler=address)
        db = tmp_path / "db.sqlite"
        assert main(["rollout", str(plan), "--db", str(db), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "completed"
        package_id = RolloutStore(db).rollout("tls").package_id
        for host in hosts.values():
            with agent.open(host.pid) as backend:
                assert [p.package_id for p in Engine(backend, Journal(state)).status().packages
                        if p.state == "ours"] == [package_id]
            wait_values(host, {"scale": 33})
        # abort reads the TLS files from the plan the rollout was started with
        assert main(["rollout", "abort", "tls", "--db", str(db), "--json"]) == 0
        assert {t["state"] for t in json.loads(capsys.readouterr().out)["targets"]} == {"rolled_back"}
        for host in hosts.values():
            wait_values(host, {"scale": 22})
    finally:
        for host in hosts.values():
            host.stop()
