// Daily usage (vCPU- and memory-minutes) and what is running now.
import { useState } from "preact/hooks";
import { get } from "../api";
import { BarChart, LineChart } from "../charts";
import { ErrorBox, Spinner, useLoad } from "../ui";

interface UsagePoint { date: string; cpu_minutes: number; ram_mb_minutes: number }
interface Stats {
  current: { running_count: number; vcpus_reserved: number; memory_mb_reserved: number };
  peaks: { running_count: number; vcpus: number; memory_mb: number };
  series: { labels: string[]; running: number[] };
}

const day = (d: Date) => d.toISOString().slice(0, 10);
const num = (v: number) =>
  v >= 100 ? Math.round(v).toLocaleString() : v >= 10 ? v.toFixed(0) : v >= 1 || v === 0 ? v.toFixed(1) : v.toFixed(2);

export function UsagePage() {
  const [days, setDays] = useState(14);
  const usage = useLoad<UsagePoint[]>(async () => {
    const to = new Date();
    const from = new Date(Date.now() - (days - 1) * 86400000);
    return (await get(`/v1/capsules/usage?from=${day(from)}&to=${day(to)}`)).points;
  }, [days]);
  const stats = useLoad<Stats>(() => get("/v1/capsules/stats?range=24h"));
  const s = stats.data;
  return (
    <div class="page">
      <div class="page-head">
        <h1>Usage</h1>
        <div class="grow" />
        <select aria-label="Days" value={String(days)} onChange={(e) => setDays(Number(e.currentTarget.value))}>
          {[7, 14, 30, 90].map((d) => <option key={d} value={String(d)}>last {d} days</option>)}
        </select>
      </div>
      <ErrorBox error={stats.error || usage.error} onRetry={() => { stats.reload(); usage.reload(); }} />
      {s && (
        <div class="stats">
          <div class="stat"><span>Running now</span><strong>{s.current.running_count}</strong><small>peak {s.peaks.running_count}</small></div>
          <div class="stat"><span>vCPUs reserved</span><strong>{s.current.vcpus_reserved}</strong><small>peak {s.peaks.vcpus}</small></div>
          <div class="stat"><span>Memory reserved</span><strong>{s.current.memory_mb_reserved} MiB</strong><small>peak {s.peaks.memory_mb} MiB</small></div>
        </div>
      )}
      {usage.loading && !usage.data ? (
        <Spinner label="Loading usage…" />
      ) : (
        usage.data && (
          <section class="card charts">
            <BarChart title="vCPU-minutes per day" bars={usage.data.map((p) => ({ label: p.date, value: p.cpu_minutes }))} format={num} />
            <BarChart title="Memory GiB-minutes per day" bars={usage.data.map((p) => ({ label: p.date, value: p.ram_mb_minutes / 1024 }))} format={num} />
          </section>
        )
      )}
      {s && s.series.labels.length > 0 && (
        <section class="card">
          <LineChart title="Running capsules, last 24 h" points={s.series.labels.map((l, i) => ({ x: Date.parse(l) / 1000, y: s.series.running[i] }))} format={(v) => num(v)} />
        </section>
      )}
    </div>
  );
}
