"""What a build does, parsed from a Wrenn recipe or a Dockerfile into one list of steps.

Recipe steps (Wrenn's syntax), one string each:
    RUN [--timeout=5m] cmd     START cmd     ENV K=V [K2=V2 ...]     WORKDIR dir
    USER name                  COPY src... dst
Healthcheck (Wrenn's syntax): `--interval=5s --timeout=5s --start-period=60s --retries=5 <cmd>`.

Dockerfile: FROM <template>, RUN, COPY, ENV, ARG, WORKDIR, USER, CMD / ENTRYPOINT (one START,
run after every other step, as a container's command starts after its image is built),
HEALTHCHECK, EXPOSE (recorded). Anything else is refused naming its line and instruction.

Everything here is pure (no I/O), so the step cache key of a step is a function of its text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from typing import Any

DEFAULT_RUN_TIMEOUT_S = 600.0
MAX_STEPS = 200


class SpecError(ValueError):
    """A recipe, Dockerfile or healthcheck that cannot be built; the message says where."""


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # RUN | START | ENV | WORKDIR | USER | COPY
    text: str  # as the user wrote it, for logs ("step 3/7: RUN apt-get install -y jq")
    cmd: str = ""  # RUN, START
    timeout_s: float = DEFAULT_RUN_TIMEOUT_S  # RUN
    envs: tuple[tuple[str, str], ...] = ()  # ENV: the names set; RUN: ARG values in scope
    path: str = ""  # WORKDIR, USER (the name), COPY (destination)
    srcs: tuple[str, ...] = ()  # COPY, relative to the build context

    def canonical(self) -> str:
        """What identifies the step for the cache (its text is not: spacing must not matter)."""
        d = dataclasses.asdict(self)
        d.pop("text")
        return json.dumps(d, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Healthcheck:
    cmd: str
    interval_s: float = 5.0
    timeout_s: float = 5.0
    start_period_s: float = 60.0
    retries: int = 5

    def canonical(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    steps: tuple[Step, ...]
    base_template: str | None = None  # a Dockerfile's FROM
    healthcheck: Healthcheck | None = None
    exposed_ports: tuple[int, ...] = ()

    def needs_context(self) -> bool:
        return any(s.kind == "COPY" for s in self.steps)


# ---- durations and healthchecks --------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, what: str) -> float:
    """'5s', '5m', '1h', '500ms', '1m30s' or a plain number of seconds."""
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if m is None:
            raise SpecError(f"{what}: invalid duration {text!r} (use e.g. 30s, 5m, 1h)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or total <= 0:
        raise SpecError(f"{what}: invalid duration {text!r} (use e.g. 30s, 5m, 1h)")
    return total


def _flags(tokens: list[str], allowed: set[str], what: str) -> tuple[dict[str, str], list[str]]:
    """Leading --name=value flags, then the rest."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(tokens) and tokens[i].startswith("--"):
        name, eq, value = tokens[i][2:].partition("=")
        if name not in allowed or not eq:
            raise SpecError(f"{what}: unknown option {tokens[i]!r} (allowed: "
                            + ", ".join(f"--{a}=..." for a in sorted(allowed)) + ")")
        flags[name] = value
        i += 1
    return flags, tokens[i:]


def _split_flags(text: str, allowed: set[str], what: str) -> tuple[dict[str, str], str]:
    """Like `_flags` but keeps the rest as the original text (a shell command stays verbatim)."""
    flags: dict[str, str] = {}
    rest = text.strip()
    while rest.startswith("--"):
        token, _, tail = rest.partition(" ")
        f, _ = _flags([token], allowed, what)
        flags.update(f)
        rest = tail.strip()
    return flags, rest


def parse_healthcheck(text: str, what: str = "healthcheck") -> Healthcheck:
    flags, cmd = _split_flags(text, {"interval", "timeout", "start-period", "retries"}, what)
    if not cmd:
        raise SpecError(f"{what}: a command is required")
    retries = flags.get("retries", "5")
    if not retries.isdigit() or int(retries) < 1:
        raise SpecError(f"{what}: --retries must be a positive integer")
    return Healthcheck(
        cmd=cmd,
        interval_s=parse_duration(flags.get("interval", "5s"), what),
        timeout_s=parse_duration(flags.get("timeout", "5s"), what),
        start_period_s=parse_duration(flags["start-period"], what) if "start-period" in flags else 60.0,
        retries=int(retries))


# ---- recipe -----------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_pairs(rest: str, what: str, *, legacy_space_form: bool) -> tuple[tuple[str, str], ...]:
    try:
        tokens = shlex.split(rest)
    except ValueError as exc:
        raise SpecError(f"{what}: {exc}") from None
    if legacy_space_form and tokens and "=" not in tokens[0]:  # Dockerfile `ENV NAME value with spaces`
        value = rest.strip()[len(tokens[0]):].strip()
        tokens = [f"{tokens[0]}={' '.join(shlex.split(value)) if value else ''}"]
    pairs = []
    for tok in tokens:
        name, eq, value = tok.partition("=")
        if not eq or not _ENV_NAME.fullmatch(name):
            raise SpecError(f"{what}: expected NAME=value, got {tok!r}")
        pairs.append((name, value))
    if not pairs:
        raise SpecError(f"{what}: expected NAME=value")
    return tuple(pairs)


def _step(kind: str, rest: str, text: str, what: str, *, args: dict[str, str] | None = None,
          dockerfile: bool = False) -> Step:
    """One RUN/START/ENV/WORKDIR/USER/COPY step from the text after its keyword."""
    rest = rest.strip()
    arg_envs = tuple(sorted((args or {}).items()))
    if kind == "RUN":
        flags, cmd = _split_flags(rest, set() if dockerfile else {"timeout"}, what)
        if not cmd:
            raise SpecError(f"{what}: RUN needs a command")
        timeout = parse_duration(flags["timeout"], what) if "timeout" in flags else DEFAULT_RUN_TIMEOUT_S
        return Step("RUN", text, cmd=cmd, timeout_s=timeout, envs=arg_envs)
    if kind == "START":
        if not rest:
            raise SpecError(f"{what}: START needs a command")
        return Step("START", text, cmd=rest, envs=arg_envs)
    if kind == "ENV":
        return Step("ENV", text, envs=_env_pairs(rest, what, legacy_space_form=dockerfile))
    if kind in ("WORKDIR", "USER"):
        try:
            parts = shlex.split(rest)
        except ValueError as exc:
            raise SpecError(f"{what}: {exc}") from None
        if len(parts) != 1:
            raise SpecError(f"{what}: {kind} takes exactly one argument")
        if kind == "WORKDIR" and not parts[0].startswith("/") and not dockerfile:
            raise SpecError(f"{what}: WORKDIR must be an absolute path")
        if kind == "USER" and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", parts[0]):
            raise SpecError(f"{what}: invalid user name {parts[0]!r} (a group is not supported)")
        return Step(kind, text, path=parts[0])
    if kind == "COPY":
        flags, rest = _split_flags(rest, set(), what)
        parts = _json_list(rest, what) if rest.startswith("[") else _shlex(rest, what)
        if len(parts) < 2:
            raise SpecError(f"{what}: COPY needs at least one source and a destination")
        for src in parts[:-1]:
            if src.startswith("/") or ".." in src.split("/"):
                raise SpecError(f"{what}: COPY source {src!r} must be a path inside the build context")
        return Step("COPY", text, path=parts[-1], srcs=tuple(parts[:-1]))
    raise SpecError(f"{what}: unknown step {kind!r} (use RUN, START, ENV, WORKDIR, USER or COPY)")


def _shlex(text: str, what: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise SpecError(f"{what}: {exc}") from None


def _json_list(text: str, what: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise SpecError(f"{what}: invalid JSON array {text!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise SpecError(f"{what}: expected a JSON array of strings")
    return value


RECIPE_KINDS = ("RUN", "START", "ENV", "WORKDIR", "USER", "COPY")


def parse_recipe(recipe: list[str], healthcheck: str | None = None) -> BuildSpec:
    if not recipe:
        raise SpecError("recipe: at least one step is required")
    if len(recipe) > MAX_STEPS:
        raise SpecError(f"recipe: at most {MAX_STEPS} steps")
    steps = []
    for i, line in enumerate(recipe, 1):
        if not isinstance(line, str) or not line.strip():
            raise SpecError(f"recipe step {i}: empty step")
        keyword, _, rest = line.strip().partition(" ")
        steps.append(_step(keyword.upper(), rest, line.strip(), f"recipe step {i} ({keyword})"))
    return BuildSpec(tuple(steps), healthcheck=parse_healthcheck(healthcheck) if healthcheck else None)


# ---- Dockerfile -------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _substitute(text: str, values: dict[str, str]) -> str:
    """$NAME, ${NAME}, ${NAME:-default} from ARG and ENV (as Docker does in ENV, WORKDIR, COPY, USER)."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name in values:
            return values[name]
        return m.group(2) if m.group(2) is not None else ""
    return _VAR.sub(repl, text)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction) with comments dropped and `\\` continuations joined."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comments may sit inside a continued instruction
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        out.append((start, " ".join(b for b in buf if b)))
        buf = []
    if buf:
        out.append((start, " ".join(b for b in buf if b)))
    return out


def _command(rest: str, what: str) -> str:
    """Shell form as is; exec form (a JSON array) as a shell-quoted command line."""
    rest = rest.strip()
    if rest.startswith("["):
        return shlex.join(_json_list(rest, what))
    if not rest:
        raise SpecError(f"{what}: a command is required")
    return rest


def parse_dockerfile(text: str, healthcheck: str | None = None) -> BuildSpec:
    steps: list[Step] = []
    args: dict[str, str] = {}
    envs: dict[str, str] = {}
    base: str | None = None
    entrypoint: str | None = None
    cmd: str | None = None
    check: Healthcheck | None = parse_healthcheck(healthcheck) if healthcheck else None
    ports: list[int] = []
    for line_no, line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        kind = keyword.upper()
        what = f"Dockerfile line {line_no} ({kind})"
        if base is None and kind not in ("FROM", "ARG"):
            raise SpecError(f"{what}: the first instruction must be FROM")
        if kind == "FROM":
            if base is not None:
                raise SpecError(f"{what}: only one FROM is supported (no multi-stage builds)")
            parts = _shlex(_substitute(rest, args), what)
            if len(parts) == 3 and parts[1].lower() == "as":
                parts = parts[:1]
            if len(parts) != 1:
                raise SpecError(f"{what}: FROM takes one template name")
            base = parts[0]
        elif kind == "ARG":
            for tok in _shlex(rest, what):
                name, eq, value = tok.partition("=")
                if not _ENV_NAME.fullmatch(name):
                    raise SpecError(f"{what}: invalid ARG {tok!r}")
                args[name] = value if eq else args.get(name, "")
        elif kind in ("RUN", "COPY", "ENV", "WORKDIR", "USER"):
            body = _command(rest, what) if kind == "RUN" else _substitute(rest, {**args, **envs})
            step = _step(kind, body, line, what, args=args, dockerfile=True)
            if kind == "WORKDIR" and not step.path.startswith("/"):  # relative to the previous one
                prev = next((s.path for s in reversed(steps) if s.kind == "WORKDIR"), "/")
                step = dataclasses.replace(step, path=prev.rstrip("/") + "/" + step.path)
            if kind == "ENV":
                envs.update(step.envs)
            steps.append(step)
        elif kind == "CMD":
            cmd = _command(rest, what)
        elif kind == "ENTRYPOINT":
            entrypoint = _command(rest, what)
        elif kind == "HEALTHCHECK":
            if rest.strip().upper() == "NONE":
                check = None
                continue
            flags, tail = _split_flags(rest, {"interval", "timeout", "start-period", "retries", "start-interval"}, what)
            if not tail.upper().startswith("CMD"):
                raise SpecError(f"{what}: expected HEALTHCHECK [options] CMD command")
            flags.pop("start-interval", None)
            opts = " ".join(f"--{k}={v}" for k, v in flags.items())
            check = parse_healthcheck(f"{opts} {_command(tail[3:], what)}".strip(), what)
        elif kind == "EXPOSE":
            for tok in _shlex(_substitute(rest, {**args, **envs}), what):
                port = tok.split("/")[0]
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise SpecError(f"{what}: invalid port {tok!r}")
                ports.append(int(port))
        else:
            raise SpecError(f"{what}: instruction {kind} is not supported (supported: FROM, RUN, COPY, ENV, "
                            "ARG, WORKDIR, USER, CMD, ENTRYPOINT, HEALTHCHECK, EXPOSE)")
    if base is None:
        raise SpecError("Dockerfile: FROM is required")
    start = " ".join(c for c in (entrypoint, cmd) if c)
    if start:
        steps.append(Step("START", f"CMD {start}", cmd=start))
    if not steps:
        raise SpecError("Dockerfile: nothing to build after FROM")
    if len(steps) > MAX_STEPS:
        raise SpecError(f"Dockerfile: at most {MAX_STEPS} steps")
    return BuildSpec(tuple(steps), base_template=base, healthcheck=check, exposed_ports=tuple(ports))


# ---- step cache keys --------------------------------------------------------------------------

def layer_keys(scope: str, base_template_id: str, steps: tuple[Step, ...],
               context_digests: dict[int, str], shape: tuple[int, int]) -> list[str]:
    """keys[i] identifies the state after steps[:i+1]: the base, the shape, every step so far and
    the content of the files each COPY so far took (context_digests: step index -> digest)."""
    h = hashlib.sha256(json.dumps([scope, base_template_id, list(shape)]).encode())
    keys = []
    for i, step in enumerate(steps):
        h.update(step.canonical().encode())
        h.update(context_digests.get(i, "").encode())
        keys.append(h.copy().hexdigest())
    return keys


def summary(spec: BuildSpec) -> dict[str, Any]:
    """For the build record: the steps as written."""
    return {"steps": [s.text for s in spec.steps], "exposed_ports": list(spec.exposed_ports),
            "healthcheck": dataclasses.asdict(spec.healthcheck) if spec.healthcheck else None}
