"""Recipe, Dockerfile and healthcheck parsing (pure), and step cache keys."""

from __future__ import annotations

import pytest

from wrenn_control.builds.spec import SpecError, layer_keys, parse_dockerfile, parse_healthcheck, parse_recipe


def test_recipe_steps():
    spec = parse_recipe(["RUN --timeout=5m apt-get update && apt-get install -y jq", "START python3 -m http.server 8000",
                         'ENV A=1 B="two words"', "WORKDIR /srv/app", "USER app", "COPY a.txt dir/ /srv/"],
                        healthcheck="--interval=1s --retries=3 curl -sf localhost:8000")
    run, start, env, workdir, user, copy = spec.steps
    assert (run.kind, run.cmd, run.timeout_s) == ("RUN", "apt-get update && apt-get install -y jq", 300)
    assert start.cmd == "python3 -m http.server 8000"
    assert env.envs == (("A", "1"), ("B", "two words"))
    assert (workdir.path, user.path) == ("/srv/app", "app")
    assert (copy.srcs, copy.path) == (("a.txt", "dir/"), "/srv/")
    hc = spec.healthcheck
    assert (hc.cmd, hc.interval_s, hc.timeout_s, hc.start_period_s, hc.retries) == ("curl -sf localhost:8000", 1, 5, 60, 3)
    assert spec.needs_context()


@pytest.mark.parametrize("recipe, message", [
    ([], "at least one step"),
    (["FROB x"], "unknown step 'FROB'"),
    (["RUN --timeout=soon ls"], "invalid duration"),
    (["RUN --user=x ls"], "unknown option"),
    (["ENV novalue"], "NAME=value"),
    (["WORKDIR relative"], "absolute"),
    (["COPY ../etc/passwd /x"], "inside the build context"),
    (["COPY onlyone"], "one source and a destination"),
])
def test_recipe_errors(recipe, message):
    with pytest.raises(SpecError, match=message):
        parse_recipe(recipe)


def test_healthcheck_errors():
    with pytest.raises(SpecError, match="a command is required"):
        parse_healthcheck("--interval=5s")
    with pytest.raises(SpecError, match="retries"):
        parse_healthcheck("--retries=0 true")
    assert parse_healthcheck("--start-period=1m30s true").start_period_s == 90


def test_dockerfile():
    spec = parse_dockerfile("""
# a comment
ARG VERSION=1.2
FROM minimal
RUN apt-get update \\
    && apt-get install -y jq
COPY ["hello.txt", "/srv/"]
ENV GREETING=hi APP_VERSION=$VERSION
ENV LEGACY some value
WORKDIR /srv
WORKDIR app
USER app
EXPOSE 8000/tcp 9000
HEALTHCHECK --interval=2s --timeout=3s CMD curl -sf http://127.0.0.1:8000/
ENTRYPOINT ["python3", "-m"]
CMD ["http.server", "8000"]
""")
    assert spec.base_template == "minimal"
    kinds = [s.kind for s in spec.steps]
    assert kinds == ["RUN", "COPY", "ENV", "ENV", "WORKDIR", "WORKDIR", "USER", "START"]
    assert spec.steps[0].cmd == "apt-get update && apt-get install -y jq"
    assert spec.steps[0].envs == (("VERSION", "1.2"),)  # ARGs reach RUN as its environment
    assert spec.steps[2].envs == (("GREETING", "hi"), ("APP_VERSION", "1.2"))
    assert spec.steps[3].envs == (("LEGACY", "some value"),)
    assert spec.steps[5].path == "/srv/app"
    assert spec.steps[-1].cmd == "python3 -m http.server 8000"
    assert spec.exposed_ports == (8000, 9000)
    assert (spec.healthcheck.cmd, spec.healthcheck.interval_s) == ("curl -sf http://127.0.0.1:8000/", 2)


@pytest.mark.parametrize("text, message", [
    ("RUN ls", "line 1 \\(RUN\\): the first instruction must be FROM"),
    ("FROM minimal\nADD x /y", "line 2 \\(ADD\\): instruction ADD is not supported"),
    ("FROM minimal\n\nVOLUME /data", "line 3 \\(VOLUME\\)"),
    ("FROM minimal\nFROM base-python", "only one FROM"),
    ("FROM minimal\nHEALTHCHECK curl x", "HEALTHCHECK \\[options\\] CMD"),
    ("FROM minimal\nRUN [1, 2]", "JSON array of strings"),
    ("", "FROM is required"),
])
def test_dockerfile_errors(text, message):
    with pytest.raises(SpecError, match=message):
        parse_dockerfile(text)


def test_layer_keys_chain():
    a = parse_recipe(["RUN echo 1", "RUN echo 2", "RUN echo 3"]).steps
    b = parse_recipe(["RUN  echo 1", "RUN echo 2", "RUN echo three"]).steps
    ka = layer_keys("team", "minimal@v1", a, {}, (1, 512))
    kb = layer_keys("team", "minimal@v1", b, {}, (1, 512))
    assert ka[1] != kb[1] or a[0].cmd == b[0].cmd  # text spacing: same command, same key
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    assert layer_keys("other", "minimal@v1", a, {}, (1, 512))[0] != ka[0]
    assert layer_keys("team", "minimal@v2", a, {}, (1, 512))[0] != ka[0]
    assert layer_keys("team", "minimal@v1", a, {0: "ctx"}, (1, 512))[0] != ka[0]
