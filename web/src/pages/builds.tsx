// Template builds on the Templates page: the list, a form to build from a Dockerfile, and one
// build's live log (an EventSource opened with a single-use ticket, as the event stream is).
import { useEffect, useRef, useState } from "preact/hooks";
import { type Build, post, get, ticket } from "../api";
import { ActionButton, Empty, ErrorBox, StatusBadge, when, useLoad } from "../ui";

const RUNNING = new Set(["pending", "running"]);
const EXAMPLE = "FROM minimal\nRUN echo hello > /tmp/hello\n";

function steps(b: { current_step: number; total_steps: number }): string {
  return b.total_steps ? `${b.current_step}/${b.total_steps}` : "–";
}

export function BuildsSection({ onBuilt }: { onBuilt: () => void }) {
  const builds = useLoad<Build[]>(() => get("/v1/builds"));
  const [open, setOpen] = useState<string | null>(null);
  const list = builds.data || [];
  // Steps and statuses of builds under way (the open one has its own live stream).
  const underWay = list.some((b) => RUNNING.has(b.status));
  useEffect(() => {
    if (!underWay) return;
    const timer = window.setInterval(builds.reload, 3000);
    return () => clearInterval(timer);
  }, [underWay, builds.reload]);
  return (
    <section class="builds">
      <div class="page-head"><h2>Builds</h2></div>
      <NewBuild onStarted={(b) => { setOpen(b.id); builds.reload(); }} />
      <ErrorBox error={builds.error} onRetry={builds.reload} />
      {open && (
        <BuildLog key={open} id={open} onEnd={(b) => { builds.reload(); if (b.status === "success") onBuilt(); }}
          onClose={() => setOpen(null)} />
      )}
      {list.length === 0 ? (
        !builds.loading && <Empty>No builds yet.</Empty>
      ) : (
        <table class="table">
          <thead><tr><th>Name</th><th>Status</th><th>Step</th><th>Created</th><th /></tr></thead>
          <tbody>
            {list.map((b) => (
              <tr key={b.id} data-build={b.id}>
                <td data-label="Name" class="mono">{b.name}</td>
                <td data-label="Status"><StatusBadge status={b.status} /></td>
                <td data-label="Step">{steps(b)}</td>
                <td data-label="Created">{when(b.created_at)}</td>
                <td class="right"><button class="btn plain" onClick={() => setOpen(b.id)}>Log</button></td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

function NewBuild({ onStarted }: { onStarted: (b: Build) => void }) {
  const [name, setName] = useState("");
  const [dockerfile, setDockerfile] = useState(EXAMPLE);
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onStarted(await post("/v1/builds", { name: name.trim(), dockerfile }));
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  return (
    <form class="card build-form" onSubmit={submit} aria-label="New build">
      <label>
        Template name
        <input name="name" required value={name} onInput={(e) => setName(e.currentTarget.value)} placeholder="my-template" />
      </label>
      <label>
        Dockerfile
        <textarea name="dockerfile" rows={5} class="mono" value={dockerfile} onInput={(e) => setDockerfile(e.currentTarget.value)} />
      </label>
      <ErrorBox error={error} />
      <div><button type="submit" class="btn primary" disabled={busy}>{busy ? "Starting…" : "Start build"}</button></div>
    </form>
  );
}

function BuildLog({ id, onEnd, onClose }: { id: string; onEnd: (b: Build) => void; onClose: () => void }) {
  const [text, setText] = useState("");
  const [step, setStep] = useState({ current_step: 0, total_steps: 0 });
  const [build, setBuild] = useState<Build | null>(null);
  const [ended, setEnded] = useState<Build | null>(null);
  const [error, setError] = useState<unknown>(null);
  const ending = useRef(onEnd);
  ending.current = onEnd;
  const pre = useRef<HTMLPreElement>(null);
  useEffect(() => {
    let source: EventSource | null = null;
    let stopped = false;
    let timer: number | undefined;
    get(`/v1/builds/${id}`).then((b: Build) => !stopped && setBuild(b), (e) => !stopped && setError(e));
    const open = async () => {
      try {
        const t = await ticket();
        if (stopped) return;
        source = new EventSource(`/api/v1/builds/${encodeURIComponent(id)}/logs?ticket=${encodeURIComponent(t)}`);
      } catch (e) {
        setError(e);
        return;
      }
      setText(""); // each connection sends the whole log so far
      source.addEventListener("log", (m) => setText((s) => s + JSON.parse((m as MessageEvent).data).data));
      source.addEventListener("step", (m) => setStep(JSON.parse((m as MessageEvent).data)));
      source.addEventListener("end", (m) => {
        const b = JSON.parse((m as MessageEvent).data) as Build;
        stopped = true;
        source?.close();
        setEnded(b);
        setStep(b);
        ending.current(b);
      });
      // The ticket is spent, so EventSource's own reconnect would be refused: reconnect ourselves.
      source.onerror = () => {
        source?.close();
        if (!stopped) timer = window.setTimeout(open, 2000);
      };
    };
    open();
    return () => {
      stopped = true;
      clearTimeout(timer);
      source?.close();
    };
  }, [id]);
  useEffect(() => {
    if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text]);
  const shown = ended || build;
  const status = ended ? ended.status : build && !RUNNING.has(build.status) ? build.status : step.total_steps ? "running" : build?.status;
  return (
    <div class="card build-log" data-testid="build-log" aria-label="Build log">
      <div class="page-head">
        <h2>Build <span class="mono">{shown?.name ?? id}</span></h2>
        {status && <StatusBadge status={status} />}
        <span class="muted" data-testid="build-step">step {steps(step.total_steps ? step : shown || step)}</span>
        <span class="actions">
          {!ended && status && RUNNING.has(status) && (
            <ActionButton kind="danger" busyLabel="Cancelling…" onClick={() => post(`/v1/builds/${encodeURIComponent(id)}/cancel`)}>Cancel</ActionButton>
          )}
          <button class="btn plain" onClick={onClose}>Close</button>
        </span>
      </div>
      <ErrorBox error={error} />
      {ended?.error && <div class="error" role="alert">Build {ended.status}: {ended.error}</div>}
      <pre ref={pre} class="log mono" data-testid="build-log-text">{text || "Waiting for the log…"}</pre>
    </div>
  );
}
