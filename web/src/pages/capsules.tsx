// The team's capsules, kept current by the event stream; filter by status; create; act on each.
import { useEffect, useMemo, useState } from "preact/hooks";
import { type Capsule, type Template, get } from "../api";
import { type TeamEvent, useTeamEvents } from "../events";
import { navigate, useLocation } from "../router";
import { ErrorBox, Spinner, StatusBadge, ago, duration, toast, useLoad } from "../ui";
import { CapsuleActions } from "./actions";
import { CreateCapsule } from "./create";

const FILTERS = ["all", "running", "paused", "stopped", "error"] as const;
type Filter = (typeof FILTERS)[number];

export function CapsulesPage() {
  const { query } = useLocation();
  const capsules = useLoad<Capsule[]>(() => get("/v1/capsules"));
  const templates = useLoad<Template[]>(() => get("/v1/snapshots"));
  const [filter, setFilter] = useState<Filter>((query.get("status") as Filter) || "all");
  const [text, setText] = useState("");
  const [creating, setCreating] = useState(query.has("new"));

  const upsert = (c: Capsule) =>
    capsules.setData((list) => {
      const rest = (list || []).filter((x) => x.id !== c.id);
      return [c, ...rest].sort((a, b) => b.created_at.localeCompare(a.created_at));
    });

  const stream = useTeamEvents((e: TeamEvent) => {
    if (e.event === "connected") capsules.reload(); // catch up on what happened while away
    else if (e.event.startsWith("capsule.") && e.sandbox?.id) upsert(e.sandbox as Capsule);
    else if (e.event.startsWith("template.")) templates.reload();
  });

  useEffect(() => {
    const t = setInterval(() => capsules.setData((l) => l && [...l]), 30000); // refresh "x min ago"
    return () => clearInterval(t);
  }, []);

  const all = capsules.data || [];
  const counts = useMemo(() => {
    const c: Record<string, number> = { all: all.length };
    for (const x of all) c[x.status] = (c[x.status] || 0) + 1;
    return c;
  }, [all]);
  const shown = all.filter(
    (c) => (filter === "all" || c.status === filter) && (!text || c.id.includes(text.trim()) || c.template.includes(text.trim())),
  );

  return (
    <div class="page">
      <div class="page-head">
        <h1>Capsules</h1>
        <span class={`live ${stream}`} title="Updates from the event stream">
          {stream === "live" ? "● Live" : stream === "connecting" ? "Connecting…" : "Reconnecting…"}
        </span>
        <div class="grow" />
        {!creating && <button class="btn primary" onClick={() => setCreating(true)}>New capsule</button>}
      </div>
      {creating && (
        <CreateCapsule
          templates={templates.data || [{ name: "minimal", type: "base", vcpus: 1, memory_mb: 512, size_bytes: 0, created_at: null }]}
          initialTemplate={query.get("template") || undefined}
          onCancel={() => setCreating(false)}
          onCreated={(c) => {
            upsert(c);
            setCreating(false);
            toast(`Capsule ${c.id} created`);
            navigate(`/capsules/${c.id}`);
          }}
        />
      )}
      <div class="toolbar">
        <div class="chips" role="radiogroup" aria-label="Filter by status">
          {FILTERS.map((f) => (
            <button key={f} role="radio" aria-checked={filter === f} class={`chip ${filter === f ? "active" : ""}`} onClick={() => setFilter(f)}>
              {f} <span class="count">{counts[f] || 0}</span>
            </button>
          ))}
        </div>
        <input class="search" type="search" placeholder="Filter by id or template" value={text} onInput={(e) => setText(e.currentTarget.value)} />
      </div>
      <ErrorBox error={capsules.error} onRetry={capsules.reload} />
      {capsules.loading && !capsules.data ? (
        <Spinner label="Loading capsules…" />
      ) : shown.length === 0 ? (
        <div class="empty">
          {all.length === 0 ? "No capsules yet. Create one with “New capsule”, the SDK or the CLI." : "No capsules match this filter."}
        </div>
      ) : (
        <table class="table capsules">
          <thead>
            <tr>
              <th>Capsule</th><th>Status</th><th>Template</th><th>vCPUs</th><th>Memory</th><th>Auto-pause</th><th>Created</th><th />
            </tr>
          </thead>
          <tbody>
            {shown.map((c) => (
              <tr key={c.id} data-capsule={c.id}>
                <td data-label="Capsule"><a class="mono" href={`/capsules/${c.id}`}>{c.id}</a></td>
                <td data-label="Status"><StatusBadge status={c.status} /></td>
                <td data-label="Template">{c.template}</td>
                <td data-label="vCPUs">{c.vcpus}</td>
                <td data-label="Memory">{c.memory_mb} MiB</td>
                <td data-label="Auto-pause">{duration(c.timeout_sec)}</td>
                <td data-label="Created" title={c.created_at}>{ago(c.created_at)}</td>
                <td class="right"><CapsuleActions capsule={c} onChange={(n) => n && upsert(n)} /></td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
