// The "new capsule" form. Network policy fields are sent only when the user changed them, so
// the server's defaults apply otherwise.
import { useState } from "preact/hooks";
import { type Capsule, type Template, post } from "../api";
import { ErrorBox } from "../ui";

const TIMEOUTS: [number, string][] = [[0, "Never"], [300, "5 minutes"], [900, "15 minutes"], [3600, "1 hour"], [86400, "1 day"]];

function list(text: string): string[] {
  return text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
}

export function CreateCapsule({ templates, initialTemplate, onCreated, onCancel }: {
  templates: Template[]; initialTemplate?: string; onCreated: (c: Capsule) => void; onCancel: () => void;
}) {
  const [template, setTemplate] = useState(initialTemplate || "minimal");
  const [vcpus, setVcpus] = useState(1);
  const [memory, setMemory] = useState(512);
  const [timeout, setTimeoutSec] = useState(0);
  const [internet, setInternet] = useState<boolean | null>(null); // null: not touched
  const [allowOut, setAllowOut] = useState<string | null>(null);
  const [denyOut, setDenyOut] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const chosen = templates.find((t) => t.name === template);
  const fixedShape = chosen?.type === "snapshot";

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    const body: Record<string, unknown> = { template, timeout_sec: timeout };
    if (!fixedShape) Object.assign(body, { vcpus, memory_mb: memory });
    if (internet !== null) body.allow_internet_access = internet;
    if (allowOut !== null || denyOut !== null) {
      const network: Record<string, string[]> = {};
      if (allowOut !== null) network.allow_out = list(allowOut);
      if (denyOut !== null) network.deny_out = list(denyOut);
      body.network = network;
    }
    try {
      onCreated(await post("/v1/capsules", body));
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };

  return (
    <form class="card create" onSubmit={submit} aria-label="New capsule">
      <h2>New capsule</h2>
      <div class="grid-form">
        <label>
          Template
          <select name="template" value={template} onChange={(e) => setTemplate(e.currentTarget.value)}>
            {templates.map((t) => (
              <option key={t.name} value={t.name}>{t.name}{t.type === "snapshot" ? " (snapshot)" : ""}</option>
            ))}
          </select>
        </label>
        <label>
          vCPUs
          <input name="vcpus" type="number" min={1} max={64} value={fixedShape ? chosen!.vcpus : vcpus} disabled={fixedShape}
            onInput={(e) => setVcpus(Number(e.currentTarget.value))} />
        </label>
        <label>
          Memory (MiB)
          <input name="memory_mb" type="number" min={128} step={128} value={fixedShape ? chosen!.memory_mb : memory} disabled={fixedShape}
            onInput={(e) => setMemory(Number(e.currentTarget.value))} />
        </label>
        <label>
          Auto-pause after inactivity
          <select name="timeout_sec" value={String(timeout)} onChange={(e) => setTimeoutSec(Number(e.currentTarget.value))}>
            {TIMEOUTS.map(([v, l]) => <option key={v} value={String(v)}>{l}</option>)}
          </select>
        </label>
      </div>
      {fixedShape && <p class="muted small">A capsule from a snapshot keeps the snapshot's vCPUs and memory.</p>}
      <details class="network">
        <summary>Network</summary>
        <label class="check">
          <input name="allow_internet_access" type="checkbox" checked={internet ?? true} onChange={(e) => setInternet(e.currentTarget.checked)} />
          Allow internet access
        </label>
        <div class="grid-form two">
          <label>
            Always allow (addresses, CIDRs, domains)
            <textarea name="allow_out" rows={2} placeholder="10.0.0.0/8, pypi.org, *.example.com" value={allowOut ?? ""}
              onInput={(e) => setAllowOut(e.currentTarget.value)} />
          </label>
          <label>
            Deny
            <textarea name="deny_out" rows={2} placeholder="203.0.113.0/24" value={denyOut ?? ""} onInput={(e) => setDenyOut(e.currentTarget.value)} />
          </label>
        </div>
        <p class="muted small">An allow entry wins over a deny entry. Without internet access only the allowed entries are reachable.</p>
      </details>
      <ErrorBox error={error} />
      <div class="row end">
        <button type="button" class="btn plain" onClick={onCancel}>Cancel</button>
        <button type="submit" class="btn primary" disabled={busy}>{busy ? "Creating…" : "Create capsule"}</button>
      </div>
      {busy && <p class="muted small">The first capsule of a new vCPU/memory shape boots a template first; that can take a minute.</p>}
    </form>
  );
}
