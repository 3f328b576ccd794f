"""Dask TLS settings of an orchestrator: the CA, its certificate and key, checked before anything is sent.

A plan's ``[tls]`` table (paths relative to the plan) or the CLI's
``--tls-ca-file/--tls-cert/--tls-key`` name the files; every one must be a
readable PEM file, and the certificate must match its key (loaded with the
standard ``ssl`` module, as distributed will load them), else a
``PlanError`` naming the field. ``security()`` gives distributed's
``Security`` with encryption required: the orchestrator then talks to the
scheduler over ``tls://`` only, proving who it is with its certificate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PlanError

__all__ = ["TLS_FIELDS", "TlsSettings", "parse_tls"]

#: the plan's [tls] fields, in the order of the CLI options --tls-ca-file, --tls-cert, --tls-key
TLS_FIELDS = ("ca_file", "cert", "key")


@dataclass(frozen=True)
class TlsSettings:
    ca_file: Path
    cert: Path
    key: Path

    def security(self) -> Any:
        """distributed's Security for a client of the scheduler (the orchestrator)."""
        from distributed.security import Security

        return Security(tls_ca_file=str(self.ca_file), tls_client_cert=str(self.cert),
                        tls_client_key=str(self.key), require_encryption=True)

    def cluster_security(self) -> Any:
        """The same files for every party of a cluster started on this machine (no scheduler given)."""
        from distributed.security import Security

        cert, key = str(self.cert), str(self.key)
        return Security(tls_ca_file=str(self.ca_file), tls_client_cert=cert, tls_client_key=key,
                        tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key,
                        require_encryption=True)


def _readable(path: Path, where: str) -> Path:
    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        raise PlanError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in head:
        raise PlanError(f"{where}: {path} is not a PEM file")
    return path


def parse_tls(values: dict[str, Any], base_dir: Path, path: str = "tls.") -> TlsSettings | None:
    """TLS settings from ``values`` (ca_file, cert, key; relative paths from ``base_dir``), or None when
    none is given. ``path`` prefixes the field names in errors ("tls." in a plan, "--tls-" on the CLI)."""
    unknown = sorted(set(values) - set(TLS_FIELDS))
    if unknown:
        raise PlanError(f"{path}{unknown[0]}: unknown field")
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return None
    for name in TLS_FIELDS:
        if name not in given:
            raise PlanError(f"{_field(path, name)}: missing (TLS needs the CA file, a certificate and its key)")
        if not isinstance(given[name], str | Path) or not str(given[name]):
            raise PlanError(f"{_field(path, name)}: expected a file path")
    files = {name: _readable(base_dir / given[name], _field(path, name)) for name in TLS_FIELDS}
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files["ca_file"]))
    except ssl.SSLError as exc:
        raise PlanError(f"{_field(path, 'ca_file')}: {files['ca_file']} holds no CA certificate: {exc}") from None
    try:
        context.load_cert_chain(str(files["cert"]), str(files["key"]))
    except ssl.SSLError as exc:
        raise PlanError(f"{_field(path, 'cert')}: {files['cert']} and {files['key']} are not a certificate "
                        f"and its key: {exc.reason or exc}") from None
    return TlsSettings(files["ca_file"], files["cert"], files["key"])


def _field(path: str, name: str) -> str:
    return f"{path}{name.replace('_', '-')}" if path.startswith("--") else f"{path}{name}"
