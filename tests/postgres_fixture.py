"""A real PostgreSQL server for the tests of REM-S's store.

``postgres_server`` is one throwaway cluster for the whole run (:class:`vims.remote.pgcluster.TempCluster`:
Debian's ``initdb``/``pg_ctl`` in a temporary folder, a unix socket there, no TCP port; as the
``postgres`` account when the tests run as root), or the server ``$VIMS_TEST_POSTGRES`` names
(``postgresql://...``; its role needs CREATE on the database). The system's own cluster is not used.
``postgres_url`` gives each test a fresh, empty schema on it (dropped after), as a URL whose
``search_path`` names that schema. Tests needing it are skipped, saying why, when no PostgreSQL server
binaries are installed (``scripts/system-packages.sh`` installs them).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from tests.required import missing
from vims.errors import MissingDependencyError
from vims.remote.pgcluster import TempCluster

_cluster: list[TempCluster] = []  # one for the run, however many modules import the fixture


def _stop() -> None:
    while _cluster:
        _cluster.pop().stop()


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> str:
    """The URL of a PostgreSQL server's database the tests may create schemas in."""
    url = os.environ.get("VIMS_TEST_POSTGRES")
    if url:
        return url
    if not _cluster:
        try:
            cluster = TempCluster(fsync=False)
        except MissingDependencyError as exc:
            missing(str(exc))
        request.config.add_cleanup(_stop)
        _cluster.append(cluster)
        cluster.start()
    return _cluster[0].url()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty schema of the test server, as a URL whose ``search_path`` is that schema."""
    schema = f"vims_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{postgres_server}{'&' if '?' in postgres_server else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
