"""Every Python snippet of the five spec pages, run verbatim against a real server.

The snippets are read from the spec files at test time. Only placeholders are replaced: the
example capsule id ``cl-abc123`` by a fresh running capsule (one per snippet that uses it,
since some destroy it) and the example key ``"wrn_..."`` by the test server's key (a literal
placeholder key could only ever get a 401). Snippets of one page run in order in one
namespace, as a reader would run them: the later ones on the client page use the import of
an earlier one.
"""

from __future__ import annotations

import codeop
import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenn import WrennClient, WrennNotFoundError

pytestmark = pytest.mark.vm

_REPO = Path(__file__).resolve().parents[2]
_SPEC_CANDIDATES = [
    Path(os.environ.get("WRENN_SPEC_DIR", "/nonexistent")),
    _REPO / "docs" / "spec",
    _REPO / "spec",
    _REPO.parent / "shared" / "spec",
    Path("/work/shared/spec"),
]
SPEC_DIR = next((d for d in _SPEC_CANDIDATES if d.is_dir()), _SPEC_CANDIDATES[-1])

PLACEHOLDER_ID = "cl-abc123"
PLACEHOLDER_KEY = '"wrn_..."'
# A snippet starts at one of these lines; the pages put prose, not code, everywhere else.
SNIPPET_START = re.compile(r"^(from wrenn\b|import asyncio\b|with WrennClient\()")
# How many snippets each page holds: a guard against the extraction silently missing some.
EXPECTED_SNIPPETS = {"000": 1, "001": 1, "002": 1, "003": 1, "004": 5}


def _valid_so_far(source: str) -> bool:
    """True if ``source`` is Python that is complete or only unfinished (an open block)."""
    try:
        codeop.compile_command(source, "<snippet>", "exec")
        return True
    except (SyntaxError, ValueError, OverflowError):
        return False


def extract_snippets(text: str) -> list[str]:
    """The Python snippets of a spec page (plain text: code is not fenced).

    A snippet runs from a start line for as long as each following line is blank, indented,
    a comment, or keeps the code valid; the first line of prose ends it.
    """
    lines = text.splitlines()
    snippets: list[str] = []
    i = 0
    while i < len(lines):
        if not SNIPPET_START.match(lines[i]):
            i += 1
            continue
        block = [lines[i]]
        i += 1
        while i < len(lines):
            line = lines[i]
            if (
                not line.strip()
                or line[:1] in (" ", "\t", "#")
                or _valid_so_far("\n".join(block + [line]))
            ):
                block.append(line)
                i += 1
            else:
                break
        source = "\n".join(block).rstrip() + "\n"
        compile(source, "<snippet>", "exec")  # a half-extracted snippet fails here, loudly
        snippets.append(source)
    return snippets


def spec_pages() -> list[Path]:
    return sorted(SPEC_DIR.glob("*.txt"))


def test_extraction_finds_every_snippet() -> None:
    """Runs without a server: the extractor sees every snippet of every page."""
    pages = spec_pages()
    assert len(pages) == 5, f"expected the five spec pages in {SPEC_DIR}"
    for page in pages:
        snippets = extract_snippets(page.read_text())
        assert len(snippets) == EXPECTED_SNIPPETS[page.name[:3]], (page.name, snippets)


@pytest.fixture
def env(wrenn_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WRENN_API_KEY", wrenn_server.api_key)
    monkeypatch.setenv("WRENN_BASE_URL", wrenn_server.base_url)
    return wrenn_server


@pytest.fixture
def client(env) -> Iterator[WrennClient]:
    """A client that also destroys, at the end, every capsule created during the test."""
    with WrennClient() as c:
        before = {cap.id for cap in c.capsules.list()}
        with contextlib.suppress(WrennNotFoundError):
            c.snapshots.delete("my-snapshot")  # left over by an earlier failed run
        yield c
        for cap in c.capsules.list():
            if cap.id not in before and cap.status != "stopped":
                with contextlib.suppress(Exception):
                    c.capsules.destroy(cap.id)
        with contextlib.suppress(WrennNotFoundError):
            c.snapshots.delete("my-snapshot")


def run_page(page: Path, client: WrennClient, server) -> tuple[list[str], list[str]]:
    """Run a page's snippets in order; return each snippet's stdout and the ids substituted."""
    namespace: dict[str, object] = {"__name__": f"spec_{page.stem}"}
    outputs: list[str] = []
    ids: list[str] = []
    for n, snippet in enumerate(extract_snippets(page.read_text()), 1):
        source = snippet.replace(PLACEHOLDER_KEY, repr(server.api_key))
        if PLACEHOLDER_ID in source:
            capsule = client.capsules.create(template="minimal")
            client.capsules.wait(capsule.id, "running")
            ids.append(capsule.id)
            source = source.replace(PLACEHOLDER_ID, capsule.id)
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(source, f"{page.name}#snippet{n}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(
                f"{page.name} snippet {n} failed: {exc!r}\n--- snippet ---\n{source}"
            ) from exc
        outputs.append(buffer.getvalue())
    return outputs, ids


def page(prefix: str) -> Path:
    return next(p for p in spec_pages() if p.name.startswith(prefix))


def test_list_capsules_page(client: WrennClient, env) -> None:
    mine = client.capsules.create(template="minimal")
    client.capsules.wait(mine.id)
    (out,), _ = run_page(page("000"), client, env)
    rows = [line.split() for line in out.splitlines()]
    assert [mine.id, "running"] in rows
    assert all(row[0].startswith("cl-") and len(row) == 2 for row in rows)


def test_get_capsule_page(client: WrennClient, env) -> None:
    (out,), (cid,) = run_page(page("001"), client, env)
    assert out.splitlines() == ["running", client.capsules.get(cid).template, "running"]


def test_create_capsule_page(client: WrennClient, env) -> None:
    (out,), _ = run_page(page("002"), client, env)
    cid, status = out.splitlines()
    assert cid.startswith("cl-") and status == "running"
    info = client.capsules.get(cid)
    assert (info.template, info.vcpus, info.memory_mb, info.timeout_sec) == (
        "base-python",
        2,
        1024,
        300,
    )


def test_pause_capsule_page(client: WrennClient, env) -> None:
    (out,), (cid,) = run_page(page("003"), client, env)
    assert out.splitlines() == ["paused"]
    assert client.capsules.get(cid).status == "paused"


def test_client_page(client: WrennClient, env) -> None:
    outputs, ids = run_page(page("004"), client, env)
    assert outputs[1].strip().startswith("cl-")  # print(capsule.id)
    lifecycle_id, snapshot_source_id = ids
    assert client.capsules.get(lifecycle_id).status == "stopped"  # the snippet destroyed it
    assert client.capsules.get(snapshot_source_id).status == "paused"  # a snapshot leaves it paused
    assert "my-snapshot" not in [
        t.name for t in client.snapshots.list()
    ]  # and deleted the template
