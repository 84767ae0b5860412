"""Placement (hosts/placement.py) on rows in a real database: spread by reserved vCPUs and
memory, overcommit, template preference and pinning, offline/draining/unregistered hosts never."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select

from wrenn_control.bootstrap import add_team
from wrenn_control.clock import utcnow
from wrenn_control.db.migrate import run_migrations
from wrenn_control.db.models import Capsule, Host, Team, Template
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.hosts.placement import place

_ids = itertools.count()


@pytest.fixture
def db(database_url):
    db = Database(database_url)
    run_migrations(db)
    with db.session() as s:
        add_team(s, "t")
        s.commit()
    yield db
    db.dispose()


def _host(db, host_id, *, vcpus=4, memory_mb=8192, status="online", templates=("minimal",), usage=None):
    with db.session() as s:
        s.add(Host(id=host_id, name=host_id, status=status, draining=status == "draining", vcpus=vcpus,
                   memory_mb=memory_mb, disk_mb=100_000, templates=list(templates), usage=usage or {},
                   created_at=utcnow()))
        s.commit()


def _place(db, vcpus=1, memory_mb=512, template_id="minimal", commit=True, **kw):
    """Place and write the capsule row, as CapsuleOps.start_create does."""
    with db.session() as s:
        host_id = place(s, vcpus=vcpus, memory_mb=memory_mb, template_id=template_id, **kw)
        team_id = s.scalar(select(Team.id))
        now = utcnow()
        s.add(Capsule(id=f"cl-{next(_ids)}", team_id=team_id, status="running", template=template_id,
                      template_id=template_id, vcpus=vcpus, memory_mb=memory_mb, timeout_sec=0, meta={},
                      created_at=now, last_updated=now, host_id=host_id))
        s.commit()
    return host_id


def test_least_loaded_first_so_creates_spread(db):
    for h in ("a", "b", "c"):
        _host(db, h)
    assert [_place(db) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    # a bigger host takes more before it is as loaded as the others
    _host(db, "d", vcpus=16, memory_mb=32768)
    assert [_place(db) for _ in range(3)] == ["d", "d", "d"]


def test_memory_is_counted_as_well_as_vcpus(db):
    _host(db, "a", vcpus=64, memory_mb=2048)
    _host(db, "b", vcpus=4, memory_mb=16384)
    # 1 vCPU + 1 GiB: on a that is half its memory, on b a quarter of its vCPUs
    assert _place(db, memory_mb=1024) == "b"


def test_overcommit_allows_more_vcpus_than_the_host_has(db):
    _host(db, "a", vcpus=2, memory_mb=100_000)
    for _ in range(8):  # the default allows 4x the vCPUs
        assert _place(db) == "a"
    with pytest.raises(APIError) as err:
        _place(db)
    assert (err.value.status, err.value.code) == (503, "host_unavailable")
    # and no overcommit: only what it has
    with pytest.raises(APIError):
        _place(db, overcommit_vcpu=1.0)


def test_memory_is_not_overcommitted_by_default(db):
    _host(db, "a", vcpus=64, memory_mb=1024)
    assert _place(db, memory_mb=1024) == "a"
    with pytest.raises(APIError):
        _place(db, memory_mb=128)
    assert _place(db, memory_mb=128, overcommit_memory=1.5) == "a"


def test_paused_capsules_hold_their_reservation_stopped_ones_do_not(db):
    _host(db, "a", vcpus=1, memory_mb=1024)
    _host(db, "b", vcpus=1, memory_mb=1024)
    first = _place(db, memory_mb=1024, overcommit_vcpu=1.0)
    with db.session() as s:
        s.query(Capsule).filter(Capsule.host_id == first).update({"status": "paused"})
        s.commit()
    second = _place(db, memory_mb=1024, overcommit_vcpu=1.0)
    assert second != first
    with db.session() as s:
        s.query(Capsule).filter(Capsule.host_id == first).update({"status": "stopped"})
        s.commit()
    assert _place(db, memory_mb=1024, overcommit_vcpu=1.0) == first


def test_hosts_holding_the_template_come_first(db):
    _host(db, "a", templates=("minimal",))
    _host(db, "b", templates=("minimal", "base-python"))
    _place(db, template_id="base-python")  # b, although both are empty
    assert _place(db, template_id="base-python") == "b"  # still b: a would copy the template
    assert _place(db) == "a"  # minimal is on both: the less loaded


def test_a_snapshot_template_only_goes_where_it_is(db):
    _host(db, "a", templates=("minimal",))
    _host(db, "b", templates=("minimal",))
    with db.session() as s:
        s.add(Template(id="tpl-1", team_id=s.scalar(select(Team.id)), name="snap", vcpus=1, memory_mb=512,
                       size_bytes=1, created_at=utcnow()))
        s.commit()
    with pytest.raises(APIError) as err:
        _place(db, template_id="tpl-1")
    assert err.value.code == "host_unavailable" and "tpl-1" in err.value.message
    with db.session() as s:
        s.get(Host, "b").templates = ["minimal", "tpl-1"]
        s.commit()
    assert [_place(db, template_id="tpl-1") for _ in range(3)] == ["b", "b", "b"]


def test_offline_draining_and_unregistered_hosts_get_nothing(db):
    _host(db, "a", status="offline")
    _host(db, "b", status="draining")
    _host(db, "c", status="pending", vcpus=None, memory_mb=None)
    with pytest.raises(APIError) as err:
        _place(db)
    assert err.value.message == "no host is online to take the capsule"
    _host(db, "d", vcpus=1, memory_mb=1024)
    assert _place(db) == "d"


def test_a_host_short_of_disk_is_skipped(db):
    _host(db, "a", usage={"free_disk_mb": 100})
    _host(db, "b", usage={"free_disk_mb": 10_000})
    assert [_place(db) for _ in range(2)] == ["b", "b"]
