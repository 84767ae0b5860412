// Small shared pieces: loading and error states, buttons that show they are busy, a dialog,
// toasts, formatting.
import type { ComponentChildren } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { humanError } from "./api";

export function Spinner({ label = "Loading…" }: { label?: string }) {
  return (
    <div class="loading" role="status">
      <span class="spinner" aria-hidden="true" /> {label}
    </div>
  );
}

export function ErrorBox({ error, onRetry }: { error: unknown; onRetry?: () => void }) {
  if (!error) return null;
  return (
    <div class="error" role="alert">
      <span>{humanError(error)}</span>
      {onRetry && (
        <button class="link" onClick={onRetry}>
          Try again
        </button>
      )}
    </div>
  );
}

export function Empty({ children }: { children: ComponentChildren }) {
  return <div class="empty">{children}</div>;
}

/** Load something, with loading/error state and a reload function. */
export function useLoad<T>(fn: () => Promise<T>, deps: unknown[] = []) {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(true);
  const seq = useRef(0);
  const reload = useCallback(async () => {
    const mine = ++seq.current;
    setLoading(true);
    try {
      const value = await fn();
      if (mine === seq.current) {
        setData(value);
        setError(null);
      }
    } catch (e) {
      if (mine === seq.current) setError(e);
    } finally {
      if (mine === seq.current) setLoading(false);
    }
  }, deps);
  useEffect(() => {
    reload();
  }, [reload]);
  return { data, error, loading, reload, setData };
}

type ButtonProps = {
  children?: ComponentChildren;
  title?: string;
  onClick: () => Promise<unknown> | void;
  busyLabel?: string;
  kind?: "primary" | "danger" | "plain";
  disabled?: boolean;
  type?: "button" | "submit";
};

/** A button that shows it is working while its action runs, and reports a failure as a toast. */
export function ActionButton({ onClick, busyLabel, kind = "plain", children, disabled, title, type = "button" }: ButtonProps) {
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    try {
      await onClick();
    } catch (e) {
      toast(humanError(e), "error");
    } finally {
      setBusy(false);
    }
  };
  return (
    <button type={type} title={title} class={`btn ${kind}`} disabled={disabled || busy} aria-busy={busy} onClick={run}>
      {busy ? (
        <>
          <span class="spinner small" aria-hidden="true" /> {busyLabel ?? children}
        </>
      ) : (
        children
      )}
    </button>
  );
}

export function Dialog({ title, children, onClose }: { title: string; children: ComponentChildren; onClose: () => void }) {
  useEffect(() => {
    const esc = (e: KeyboardEvent) => e.key === "Escape" && onClose();
    addEventListener("keydown", esc);
    return () => removeEventListener("keydown", esc);
  }, [onClose]);
  return (
    <div class="overlay" onClick={(e) => e.target === e.currentTarget && onClose()}>
      <div class="dialog" role="dialog" aria-modal="true" aria-label={title}>
        <h2>{title}</h2>
        {children}
      </div>
    </div>
  );
}

/** "Are you sure?" with one dangerous button. */
export function Confirm({ title, message, action, onDone, label = "Delete" }: {
  title: string; message: ComponentChildren; action: () => Promise<unknown>; onDone: () => void; label?: string;
}) {
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const go = async () => {
    setBusy(true);
    try {
      await action();
      onDone();
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  return (
    <Dialog title={title} onClose={onDone}>
      <p>{message}</p>
      <ErrorBox error={error} />
      <div class="row end">
        <button class="btn plain" onClick={onDone}>Cancel</button>
        <button class="btn danger" disabled={busy} onClick={go}>{busy ? "Working…" : label}</button>
      </div>
    </Dialog>
  );
}

// ---- toasts ------------------------------------------------------------------------------

type Toast = { id: number; text: string; kind: "info" | "error" };
let toasts: Toast[] = [];
let nextToast = 1;
const toastListeners = new Set<() => void>();

export function toast(text: string, kind: "info" | "error" = "info"): void {
  const t = { id: nextToast++, text, kind };
  toasts = [...toasts, t];
  toastListeners.forEach((fn) => fn());
  setTimeout(() => {
    toasts = toasts.filter((x) => x.id !== t.id);
    toastListeners.forEach((fn) => fn());
  }, kind === "error" ? 8000 : 4000);
}

export function Toasts() {
  const [, tick] = useState(0);
  useEffect(() => {
    const fn = () => tick((n) => n + 1);
    toastListeners.add(fn);
    return () => {
      toastListeners.delete(fn);
    };
  }, []);
  return (
    <div class="toasts" aria-live="polite">
      {toasts.map((t) => (
        <div key={t.id} class={`toast ${t.kind}`} role={t.kind === "error" ? "alert" : "status"}>{t.text}</div>
      ))}
    </div>
  );
}

// ---- formatting --------------------------------------------------------------------------

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function ago(iso: string | null | undefined): string {
  if (!iso) return "–";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 5) return "just now";
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function when(iso: string | null | undefined): string {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function duration(sec: number): string {
  if (!sec) return "never";
  if (sec < 120) return `${sec} s`;
  if (sec < 7200) return `${Math.round(sec / 60)} min`;
  return `${Math.round(sec / 3600)} h`;
}

export function StatusBadge({ status }: { status: string }) {
  return <span class={`badge st-${status}`}>{status}</span>;
}

export async function copyText(text: string): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context, or no permission: fall back to a selection.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
