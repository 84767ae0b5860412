// One capsule: its fields, metrics charts, and (while running) terminal, files, processes, ports.
import { useEffect, useState } from "preact/hooks";
import { type Capsule, type MetricPoint, get } from "../api";
import { LineChart } from "../charts";
import { useTeamEvents } from "../events";
import { ErrorBox, Spinner, StatusBadge, ago, bytes, duration, useLoad, when } from "../ui";
import { CapsuleActions } from "./actions";
import { FilesPane } from "./files";
import { ProcessesPane } from "./processes";
import { TerminalPane } from "./terminal";

const TABS = ["Terminal", "Files", "Processes & ports"] as const;
type Tab = (typeof TABS)[number];
const RANGES = ["5m", "10m", "1h", "6h", "24h"];

export function CapsulePage({ id }: { id: string }) {
  const capsule = useLoad<Capsule>(() => get(`/v1/capsules/${id}`), [id]);
  const [tab, setTab] = useState<Tab>("Terminal");
  useTeamEvents((e) => {
    if (e.event === "connected" || e.sandbox?.id === id) capsule.reload();
  });
  const c = capsule.data;
  const running = c?.status === "running";
  return (
    <div class="page">
      <p class="back"><a href="/capsules">← Capsules</a></p>
      <ErrorBox error={capsule.error} onRetry={capsule.reload} />
      {!c ? (
        capsule.loading && <Spinner label="Loading capsule…" />
      ) : (
        <>
          <div class="page-head">
            <h1 class="mono">{c.id}</h1>
            <StatusBadge status={c.status} />
            <div class="grow" />
            <CapsuleActions capsule={c} onChange={(n) => n && capsule.setData({ ...c, ...n })} />
          </div>
          <Fields c={c} />
          <Metrics id={id} memoryMb={c.memory_mb} diskMb={c.disk_size_mb} live={running} />
          {running ? (
            <section class="card">
              <div class="tabs" role="tablist">
                {TABS.map((t) => (
                  <button key={t} role="tab" aria-selected={tab === t} class={tab === t ? "active" : ""} onClick={() => setTab(t)}>{t}</button>
                ))}
              </div>
              {/* The terminal stays mounted while hidden so its session is not dropped. */}
              <div hidden={tab !== "Terminal"}><TerminalPane capsuleId={id} visible={tab === "Terminal"} /></div>
              {tab === "Files" && <FilesPane capsuleId={id} />}
              {tab === "Processes & ports" && <ProcessesPane capsuleId={id} />}
            </section>
          ) : (
            <div class="empty card">
              {c.status === "paused"
                ? "The capsule is paused: its memory and disk are saved. Resume it to use its terminal and files."
                : c.status === "stopped"
                  ? "This capsule was destroyed."
                  : `The capsule is ${c.status}.`}
            </div>
          )}
        </>
      )}
    </div>
  );
}

function Fields({ c }: { c: Capsule }) {
  const rows: [string, string][] = [
    ["Template", c.template],
    ["vCPUs", String(c.vcpus)],
    ["Memory", `${c.memory_mb} MiB`],
    ["Disk", c.disk_size_mb ? `${c.disk_used_mb ?? "?"} / ${c.disk_size_mb} MiB used` : "–"],
    ["Auto-pause", c.timeout_sec ? `after ${duration(c.timeout_sec)} idle` : "never"],
    ["Created", when(c.created_at)],
    ["Started", when(c.started_at)],
    ["Last active", ago(c.last_active_at)],
  ];
  if (c.allow_internet_access !== undefined) {
    const rules = [...(c.network?.allow_out || []).map((r) => `allow ${r}`), ...(c.network?.deny_out || []).map((r) => `deny ${r}`)];
    rows.push(["Internet", (c.allow_internet_access ? "allowed" : "blocked") + (rules.length ? `; ${rules.join(", ")}` : "")]);
  }
  const meta = Object.entries(c.metadata || {});
  return (
    <section class="card">
      <dl class="fields">
        {rows.map(([k, v]) => (
          <div key={k}><dt>{k}</dt><dd>{v}</dd></div>
        ))}
        {meta.map(([k, v]) => (
          <div key={k}><dt class="mono">{k}</dt><dd class="mono">{v}</dd></div>
        ))}
      </dl>
    </section>
  );
}

function Metrics({ id, memoryMb, diskMb, live }: { id: string; memoryMb: number; diskMb?: number | null; live: boolean }) {
  const [range, setRange] = useState("10m");
  const metrics = useLoad<MetricPoint[]>(async () => (await get(`/v1/capsules/${id}/metrics?range=${range}`)).points, [id, range]);
  useEffect(() => {
    if (!live) return;
    const t = setInterval(metrics.reload, 5000);
    return () => clearInterval(t);
  }, [live, metrics.reload]);
  const pts = metrics.data || [];
  const series = (f: (p: MetricPoint) => number | null) => pts.map((p) => ({ x: p.timestamp_unix, y: f(p) }));
  const mib = (v: number) => `${Math.round(v)} MiB`;
  return (
    <section class="card">
      <div class="row">
        <h2 class="grow">Metrics</h2>
        <select aria-label="Range" value={range} onChange={(e) => setRange(e.currentTarget.value)}>
          {RANGES.map((r) => <option key={r} value={r}>last {r}</option>)}
        </select>
      </div>
      <ErrorBox error={metrics.error} />
      {metrics.loading && !metrics.data ? (
        <Spinner label="Loading metrics…" />
      ) : (
        <div class="charts">
          <LineChart testId="chart-cpu" title="CPU" points={series((p) => p.cpu_pct)} max={100} format={(v) => `${Math.round(v)} %`} />
          <LineChart testId="chart-mem" title={`Memory (of ${memoryMb} MiB)`} points={series((p) => (p.mem_bytes === null ? null : p.mem_bytes / 1048576))}
            max={memoryMb} format={mib} />
          <LineChart testId="chart-disk" title="Disk used" points={series((p) => (p.disk_bytes === null ? null : p.disk_bytes / 1048576))}
            max={diskMb || undefined} format={(v) => bytes(v * 1048576)} />
        </div>
      )}
    </section>
  );
}
