// The Wrenn REST API as the dashboard uses it: who is signed in, one request helper, the types.

export type Auth =
  | { kind: "key"; key: string }
  | { kind: "jwt"; token: string; email: string };

const AUTH_KEY = "wrenn.auth";
const BASE = "/api";

let auth: Auth | null = load();
const listeners = new Set<() => void>();

function load(): Auth | null {
  try {
    const raw = localStorage.getItem(AUTH_KEY);
    return raw ? (JSON.parse(raw) as Auth) : null;
  } catch {
    return null;
  }
}

export function currentAuth(): Auth | null {
  return auth;
}

export function setAuth(next: Auth | null, reason?: string): void {
  auth = next;
  if (next) localStorage.setItem(AUTH_KEY, JSON.stringify(next));
  else localStorage.removeItem(AUTH_KEY);
  signOutReason = next ? null : reason ?? null;
  listeners.forEach((fn) => fn());
}

// Why the last sign-out happened (shown on the sign-in page), if it was not the user's choice.
export let signOutReason: string | null = null;

export function onAuthChange(fn: () => void): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

function authHeaders(a: Auth | null = auth): Record<string, string> {
  if (!a) return {};
  return a.kind === "key" ? { "X-API-Key": a.key } : { Authorization: `Bearer ${a.token}` };
}

type Body = unknown;

export async function request(method: string, path: string, body?: Body, opts: { auth?: Auth | null; raw?: boolean } = {}): Promise<any> {
  const headers: Record<string, string> = authHeaders(opts.auth === undefined ? auth : opts.auth);
  let payload: BodyInit | undefined;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let resp: Response;
  try {
    resp = await fetch(BASE + path, { method, headers, body: payload });
  } catch {
    throw new ApiError(0, "network", "Cannot reach the Wrenn server. Check that it is running, then try again.");
  }
  if (!resp.ok) {
    let code = "error";
    let message = resp.statusText || `HTTP ${resp.status}`;
    try {
      const err = (await resp.json()).error;
      if (err?.message) ({ code, message } = err);
    } catch {
      /* not our JSON shape: keep the status text */
    }
    const error = new ApiError(resp.status, code, message);
    // A key that was deleted or a token that expired: back to the sign-in page, saying why.
    if (resp.status === 401 && opts.auth === undefined && auth) setAuth(null, humanError(error));
    throw error;
  }
  if (opts.raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.text();
}

export const get = (path: string) => request("GET", path);
export const post = (path: string, body?: Body) => request("POST", path, body);
export const del = (path: string) => request("DELETE", path);

function sentence(text: string): string {
  const t = text.trim();
  if (!t) return t;
  const s = t[0].toUpperCase() + t.slice(1);
  return /[.!?]$/.test(s) ? s : s + ".";
}

/** What a person should read for a failure. */
export function humanError(e: unknown): string {
  if (!(e instanceof ApiError)) return sentence(e instanceof Error ? e.message : String(e));
  const m = e.message;
  switch (e.status) {
    case 0:
      return m;
    case 401:
      if (/invalid email or password/.test(m)) return "That email and password do not match an account.";
      if (/invalid API key/.test(m)) return "That API key is not valid (it may have been deleted).";
      if (/expired/.test(m)) return "Your session has expired. Sign in again.";
      return `You are not signed in: ${m}.`;
    case 403:
      return `Not allowed: ${sentence(m)}`;
    case 404:
      return sentence(m.replace(/^capsule not found$/, "this capsule does not exist (it may have been destroyed)"));
    case 409:
      return `Not possible right now: ${sentence(m)}`;
    case 413:
      return `Too large: ${sentence(m)}`;
    case 502:
      return `The capsule did not answer as expected: ${sentence(m)}`;
    case 503:
      return `The host is unavailable: ${sentence(m)}`;
    default:
      if (e.status >= 500) return "The server hit an internal error. Try again; if it keeps happening, look at the server's log.";
      return sentence(m);
  }
}

/** A single-use, 30 s ticket for one WebSocket or event stream (they cannot send headers). */
export async function ticket(): Promise<string> {
  return (await post("/v1/auth/ticket")).ticket;
}

export function wsUrl(path: string, t: string): string {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${BASE}${path}${path.includes("?") ? "&" : "?"}ticket=${encodeURIComponent(t)}`;
}

/** The host of the port proxy for a capsule's port: `{port}-{id}.{domain}`. A browser resolves
 *  `*.localhost` to the loopback, so a server reached by a loopback address uses `localhost`. */
export function portHost(port: number, id: string): string {
  const { hostname, port: p } = location;
  const loopback = hostname === "127.0.0.1" || hostname === "[::1]" || hostname === "localhost";
  const domain = loopback ? "localhost" : hostname;
  return `${port}-${id}.${domain}${p ? ":" + p : ""}`;
}

// ---- shapes ---------------------------------------------------------------------------------

export interface Capsule {
  id: string;
  status: string;
  template: string;
  vcpus: number;
  memory_mb: number;
  timeout_sec: number;
  created_at: string;
  last_updated: string;
  started_at: string | null;
  last_active_at: string | null;
  metadata: Record<string, string>;
  allow_internet_access?: boolean;
  network?: { allow_out: string[]; deny_out: string[] };
  disk_size_mb?: number | null;
  disk_used_mb?: number | null;
}

export interface Template {
  name: string;
  type: "base" | "snapshot";
  vcpus: number;
  memory_mb: number;
  size_bytes: number;
  created_at: string | null;
}

export interface MetricPoint {
  timestamp_unix: number;
  cpu_pct: number | null;
  mem_bytes: number | null;
  disk_bytes: number | null;
}

export interface FileEntry {
  name: string;
  path: string;
  type: "file" | "directory" | "symlink";
  size: number;
  permissions: string;
  owner?: string | null;
  modified_at?: number | null;
  symlink_target?: string | null;
}

export interface Process {
  pid: number;
  tag: string;
  cmd: string;
  args: string[];
  running: boolean;
  exit_code: number | null;
}

export interface ApiKey {
  id: string;
  name: string;
  prefix: string;
  created_at: string;
}

export interface Build {
  id: string;
  name: string;
  base_template: string;
  status: "pending" | "running" | "success" | "failed" | "cancelled";
  current_step: number;
  total_steps: number;
  cached_steps: number;
  logs: string[];
  error: string | null;
  created_at: string;
  completed_at: string | null;
}
