"""A server TLS context whose certificate can change on disk without a restart.

The listening socket keeps one ``SSLContext`` for its life, so a new certificate cannot be put
into it. Instead its ``sni_callback``, called for every ClientHello, hands the handshake to the
newest context loaded from disk. Connections already open keep their old context, so no
in-flight request is dropped.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from .errors import CertificateError
from .files import FileStamp, file_stamp

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Loaded:
    context: ssl.SSLContext
    stamp: tuple[FileStamp | None, FileStamp | None]


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    return context


class ReloadingTLS:
    """Owns the listening context and swaps in a new certificate when its files change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = server_context(cert, key)
        self.context.sni_callback = self._pick
        self._current = _Loaded(self.context, self._stamp())

    def _stamp(self) -> tuple[FileStamp | None, FileStamp | None]:
        return (file_stamp(self.cert), file_stamp(self.key))

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed; keep the old certificate if they are bad.

        Called from a periodic task (and cheap: two ``stat`` calls); returns True on a swap.
        """
        stamp = self._stamp()
        if None in stamp:
            log.warning("certificate files unreadable, keeping the loaded one: %s", self.cert)
            return False
        if stamp == self._current.stamp:
            return False
        try:
            context = server_context(self.cert, self.key)
        except CertificateError as exc:
            # Kubelet updates Secret volumes by swapping a symlink, but cert and key written by
            # other tools can be caught half-way; the next poll will see the finished pair.
            log.warning("new certificate not loaded yet: %s", exc)
            return False
        self._current = _Loaded(context, stamp)
        log.info("serving certificate reloaded from %s", self.cert)
        return True

    def _pick(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.context = self._current.context
