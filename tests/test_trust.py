"""The trust store and its policy, without a process: trust add|list|remove, inspect, check_trust."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hotpatch.cli.commands import main
from hotpatch.errors import PackageKeyError, PackageSignatureError, PackageUnsignedError, PackageUntrustedError
from hotpatch.package.format import dumps, loads, save
from hotpatch.package.signing import public_key_bytes
from hotpatch.package.trust import ENV_TRUST_DIR, TrustStore, check_trust, key_id
from tests.support.packages import rich_model
from tests.support.signing import PUBLIC_KEY, SIGNING_KEY, signed


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "keys"
    monkeypatch.setenv(ENV_TRUST_DIR, str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_trust_add_list_remove_round_trip(store: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = public_key_bytes(Ed25519PrivateKey.generate())
    key_file = tmp_path / "vendor.pub"
    key_file.write_text(key.hex() + "\n")
    code, out, _ = run(capsys, "trust", "add", str(key_file), "--name", "vendor release key")
    assert code == 0 and key_id(key) in out
    assert (store / f"{key_id(key)}.pub").read_text() == f"{key.hex()}\n# vendor release key\n"
    assert os.stat(store).st_mode & 0o777 == 0o700
    code, out, _ = run(capsys, "trust", "list", "--json")
    (listed,) = json.loads(out)["keys"]
    assert (listed["key_id"], listed["name"], listed["scope"]) == (key_id(key), "vendor release key", "env")
    code, out, err = run(capsys, "trust", "remove", "0123")
    assert code == 2 and err.count("\n") == 1
    code, out, _ = run(capsys, "trust", "remove", key_id(key)[:10])
    assert code == 0 and TrustStore.default().keys() == []
    code, _, err = run(capsys, "trust", "remove", key_id(key))
    assert code == 2 and "no trusted key" in err


@pytest.mark.parametrize("content", ["zz" * 32 + "\n", "", "ab" * 16 + "\n"])
def test_trust_add_refuses_what_is_not_a_key(store: Path, capsys: pytest.CaptureFixture[str], content: str,
                                              tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text(content)
    code, _, err = run(capsys, "trust", "add", str(bad))
    assert code == 2 and err.startswith("hotpatch: error:") and err.count("\n") == 1
    assert not store.exists() or not list(store.iterdir())


def test_a_store_others_can_write_is_refused(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    TrustStore.default().add(PUBLIC_KEY.hex())
    os.chmod(store, 0o777)
    code, _, err = run(capsys, "trust", "list")
    assert code == 2 and "writable by other users" in err


def test_a_key_file_whose_name_lies_is_refused(store: Path) -> None:
    TrustStore.default().add(PUBLIC_KEY.hex())
    other = public_key_bytes(Ed25519PrivateKey.generate())
    (store / f"{key_id(PUBLIC_KEY)}.pub").write_text(other.hex() + "\n")  # swapped contents
    with pytest.raises(PackageKeyError, match="not the one its name says"):
        TrustStore.default().keys()


def test_inspect_names_the_signer_and_whether_it_is_trusted(
    store: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "p.hpk"
    save(rich_model(random.Random(3)), path, sign_key=SIGNING_KEY)
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    signature = json.loads(out)["signature"]
    assert code == 0 and signature["key_id"] == key_id(PUBLIC_KEY) and signature["trusted"] is False
    TrustStore.default().add(PUBLIC_KEY.hex(), "tests")
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    signature = json.loads(out)["signature"]
    assert signature["trusted"] is True and signature["trusted_as"] == {"scope": "env", "name": "tests"}
    code, out, _ = run(capsys, "inspect", str(path))
    assert f"key {key_id(PUBLIC_KEY)} (trusted)" in " ".join(out.split())  # rich wraps long lines


def test_policy_trusted_unsigned_and_unknown_signers() -> None:
    package = rich_model(random.Random(4))
    stranger = Ed25519PrivateKey.generate()
    check_trust(signed(package), {PUBLIC_KEY})
    check_trust(package, {PUBLIC_KEY}, allow_unsigned=True)
    with pytest.raises(PackageUnsignedError) as unsigned:
        check_trust(package, {PUBLIC_KEY})
    with pytest.raises(PackageUntrustedError) as untrusted:
        check_trust(signed(package, stranger), {PUBLIC_KEY}, allow_unsigned=True)
    assert isinstance(unsigned.value, PackageSignatureError) and isinstance(untrusted.value, PackageSignatureError)
    forged = loads(dumps(signed(package)))
    object.__setattr__(forged, "signature", bytes(64))
    with pytest.raises(PackageSignatureError) as invalid:
        check_trust(forged, {PUBLIC_KEY})
    assert invalid.value.exit_code == 2
