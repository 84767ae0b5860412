"""`wrenn template build`: telling a Dockerfile from a recipe, reading a recipe file, the context tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from wrenn_cli.templates import context_tar, is_dockerfile, recipe_steps


def test_dockerfile_or_recipe(tmp_path):
    assert is_dockerfile(Path("Dockerfile.web"), "RUN x")
    assert is_dockerfile(Path("build.txt"), "# comment\nARG V=1\nFROM minimal\n")
    assert not is_dockerfile(Path("recipe"), "# steps\nRUN apt-get install -y jq\n")


def test_recipe_steps():
    text = "# a recipe\n\nRUN apt-get update && \\\n    apt-get install -y jq\nENV A=1\n  START python3 -m http.server\n"
    assert recipe_steps(text) == ["RUN apt-get update && apt-get install -y jq", "ENV A=1",
                                  "START python3 -m http.server"]


def test_context_tar(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    with tarfile.open(fileobj=io.BytesIO(context_tar(tmp_path))) as tar:
        assert sorted(tar.getnames()) == ["a.txt", "sub", "sub/b.txt"]
