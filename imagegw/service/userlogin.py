"""A user's saved registry logins, in the file ``shifterimg login`` keeps: ``~/.udiRoot/.cred``.

One line per platform and location, ``<system>:<location>=<MUNGE credential of "user:password">``, the
file mode 0600. Shifter's client decodes these lines and sends the logins in its requests'
``authorized_locations``; ``imagegw login`` writes the same lines, after checking the login
against the registry (which ``shifterimg login`` never did).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from imagegw.registry import RegistryLogin
from imagegw.service.munge import encode_credential

CRED_FILE = Path(".udiRoot") / ".cred"


def save_login(home: Path, system: str, location: str, login: RegistryLogin, munge_socket: str | None) -> Path:
    """Save ``login`` for ``location`` on ``system`` in ``home``'s credential file (replacing an older one)."""
    path = home / CRED_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    prefix = f"{system}:{location}="
    kept = [line for line in _lines(path) if not line.startswith(prefix)]
    credential = encode_credential(f"{login.username}:{login.password}".encode(), munge_socket)
    fd, draft = tempfile.mkstemp(prefix=".cred.", dir=path.parent)  # mode 0600 from the start
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in [*kept, prefix + credential]))
    os.replace(draft, path)
    return path


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
