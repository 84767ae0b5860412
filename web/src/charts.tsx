// Charts drawn as SVG at the width of their box (no chart library needed for lines and bars).
import type { RefObject } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

function useWidth(): [RefObject<HTMLDivElement | null>, number] {
  const ref = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(600);
  useEffect(() => {
    if (!ref.current) return;
    const ro = new ResizeObserver(([entry]) => setWidth(Math.max(200, Math.floor(entry.contentRect.width))));
    ro.observe(ref.current);
    return () => ro.disconnect();
  }, []);
  return [ref, width];
}

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

const PAD = { left: 56, right: 12, top: 10, bottom: 24 };

export interface LineChartProps {
  title: string;
  points: { x: number; y: number | null }[]; // x: unix seconds
  format: (y: number) => string;
  max?: number; // a fixed top of the scale (e.g. 100 %), else from the data
  height?: number;
  testId?: string;
}

export function LineChart({ title, points, format, max, height = 150, testId }: LineChartProps) {
  const [ref, width] = useWidth();
  const valid = points.filter((p) => p.y !== null) as { x: number; y: number }[];
  const last = valid.length ? valid[valid.length - 1].y : null;
  const top = max ?? niceMax(Math.max(0, ...valid.map((p) => p.y)) * 1.1);
  const x0 = points.length ? points[0].x : 0;
  const x1 = points.length ? points[points.length - 1].x : 1;
  const w = width - PAD.left - PAD.right;
  const h = height - PAD.top - PAD.bottom;
  const sx = (x: number) => PAD.left + (x1 === x0 ? w : ((x - x0) / (x1 - x0)) * w);
  const sy = (y: number) => PAD.top + h - (Math.min(y, top) / top) * h;
  // Gaps (no sample) break the line rather than being drawn as zero.
  let d = "";
  let pen = false;
  for (const p of points) {
    if (p.y === null) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`;
    pen = true;
  }
  const area = valid.length > 1 ? `${d}L${sx(valid[valid.length - 1].x).toFixed(1)},${PAD.top + h}L${sx(valid[0].x).toFixed(1)},${PAD.top + h}Z` : "";
  const short = x1 - x0 < 600; // a few minutes: label to the second
  const time = (x: number) =>
    new Date(x * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", ...(short ? { second: "2-digit" } : {}) });
  return (
    <div class="chart" ref={ref} data-testid={testId} data-points={valid.length}>
      <div class="chart-head">
        <span>{title}</span>
        <strong>{last === null ? "–" : format(last)}</strong>
      </div>
      {valid.length === 0 ? (
        <div class="chart-empty" style={{ height: `${height}px` }}>No samples yet</div>
      ) : (
        <svg width={width} height={height} role="img" aria-label={`${title} over time`}>
          {[0, 0.5, 1].map((f) => (
            <g key={f}>
              <line class="grid" x1={PAD.left} x2={PAD.left + w} y1={sy(top * f)} y2={sy(top * f)} />
              <text class="axis" x={PAD.left - 6} y={sy(top * f) + 4} text-anchor="end">{format(top * f)}</text>
            </g>
          ))}
          <text class="axis" x={PAD.left} y={height - 6}>{time(x0)}</text>
          <text class="axis" x={PAD.left + w} y={height - 6} text-anchor="end">{time(x1)}</text>
          {area && <path class="area" d={area} />}
          <path class="line" d={d} />
          {valid.length === 1 && <circle class="dot" cx={sx(valid[0].x)} cy={sy(valid[0].y)} r={3} />}
        </svg>
      )}
    </div>
  );
}

export interface BarChartProps {
  title: string;
  bars: { label: string; value: number }[];
  format: (v: number) => string;
  height?: number;
}

export function BarChart({ title, bars, format, height = 180 }: BarChartProps) {
  const [ref, width] = useWidth();
  const top = niceMax(Math.max(0, ...bars.map((b) => b.value)) * 1.1);
  const w = width - PAD.left - PAD.right;
  const h = height - PAD.top - PAD.bottom;
  const slot = bars.length ? w / bars.length : w;
  const every = Math.max(1, Math.ceil(bars.length / Math.max(1, Math.floor(w / 56))));
  return (
    <div class="chart" ref={ref}>
      <div class="chart-head">
        <span>{title}</span>
        <strong>{format(bars.reduce((s, b) => s + b.value, 0))} total</strong>
      </div>
      <svg width={width} height={height} role="img" aria-label={title}>
        {[0, 0.5, 1].map((f) => (
          <g key={f}>
            <line class="grid" x1={PAD.left} x2={PAD.left + w} y1={PAD.top + h - f * h} y2={PAD.top + h - f * h} />
            <text class="axis" x={PAD.left - 6} y={PAD.top + h - f * h + 4} text-anchor="end">{format(top * f)}</text>
          </g>
        ))}
        {bars.map((b, i) => {
          const bh = (b.value / top) * h;
          return (
            <g key={b.label}>
              <rect class="bar" x={PAD.left + i * slot + slot * 0.15} y={PAD.top + h - bh} width={slot * 0.7} height={bh}>
                <title>{`${b.label}: ${format(b.value)}`}</title>
              </rect>
              {i % every === 0 && (
                <text class="axis" x={PAD.left + i * slot + slot / 2} y={height - 6} text-anchor="middle">{b.label.slice(5)}</text>
              )}
            </g>
          );
        })}
      </svg>
    </div>
  );
}
