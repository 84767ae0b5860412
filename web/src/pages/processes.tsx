// Background processes (list, start, kill) and links to the ports the capsule listens on.
import { useEffect, useState } from "preact/hooks";
import { type Process, del, get, humanError, portHost, post } from "../api";
import { ActionButton, Empty, ErrorBox, Spinner, toast, useLoad } from "../ui";

export function ProcessesPane({ capsuleId }: { capsuleId: string }) {
  const procs = useLoad<Process[]>(async () => (await get(`/v1/capsules/${capsuleId}/processes`)).processes, [capsuleId]);
  const [cmd, setCmd] = useState("");
  useEffect(() => {
    const t = setInterval(procs.reload, 3000); // processes end by themselves too
    return () => clearInterval(t);
  }, [procs.reload]);
  const start = async (e: Event) => {
    e.preventDefault();
    try {
      const out = await post(`/v1/capsules/${capsuleId}/exec`, { cmd: "/bin/sh", args: ["-c", cmd], background: true });
      toast(`Started pid ${out.pid} (${out.tag})`);
      setCmd("");
      procs.reload();
    } catch (err) {
      toast(humanError(err), "error");
    }
  };
  const kill = (p: Process, signal: string) => async () => {
    await del(`/v1/capsules/${capsuleId}/processes/${p.pid}?signal=${signal}`);
    procs.reload();
  };
  return (
    <div>
      <form class="row" onSubmit={start}>
        <input class="grow mono" placeholder="Run in the background, e.g. python3 -m http.server 8000" value={cmd}
          onInput={(e) => setCmd(e.currentTarget.value)} required />
        <button class="btn primary" type="submit">Start</button>
        <button class="btn plain" type="button" onClick={procs.reload}>Refresh</button>
      </form>
      <ErrorBox error={procs.error} onRetry={procs.reload} />
      {procs.loading && !procs.data ? (
        <Spinner />
      ) : !procs.data?.length ? (
        <Empty>No background processes. Start one above, or with <code>background=True</code> from the SDK.</Empty>
      ) : (
        <table class="table">
          <thead><tr><th>PID</th><th>Tag</th><th>Command</th><th>State</th><th /></tr></thead>
          <tbody>
            {procs.data.map((p) => (
              <tr key={p.pid} data-pid={p.pid}>
                <td data-label="PID" class="mono">{p.pid}</td>
                <td data-label="Tag" class="mono">{p.tag}</td>
                <td data-label="Command" class="mono wrap">{[p.cmd, ...p.args].join(" ")}</td>
                <td data-label="State">{p.running ? "running" : `exited (${p.exit_code})`}</td>
                <td class="right">
                  {p.running && (
                    <>
                      <ActionButton onClick={kill(p, "SIGTERM")}>Stop</ActionButton>
                      <ActionButton kind="danger" onClick={kill(p, "SIGKILL")}>Kill</ActionButton>
                    </>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <PortsPane capsuleId={capsuleId} />
    </div>
  );
}

/** Listening TCP ports, read from the guest's /proc/net/tcp{,6} (state 0A is LISTEN). */
function parsePorts(text: string): number[] {
  const ports = new Set<number>();
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length > 3 && f[3] === "0A" && f[1].includes(":")) ports.add(parseInt(f[1].split(":").pop()!, 16));
  }
  return [...ports].filter((p) => p > 0).sort((a, b) => a - b);
}

function PortsPane({ capsuleId }: { capsuleId: string }) {
  const ports = useLoad<number[]>(async () => {
    const out = await post(`/v1/capsules/${capsuleId}/exec`, { cmd: "/bin/sh", args: ["-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"], timeout_sec: 10 });
    return parsePorts(out.stdout || "");
  }, [capsuleId]);
  const [manual, setManual] = useState("");
  const link = (port: number) => `${location.protocol}//${portHost(port, capsuleId)}/`;
  return (
    <section class="ports">
      <div class="row">
        <h3 class="grow">Ports</h3>
        <button class="btn plain" onClick={ports.reload}>Refresh</button>
      </div>
      <p class="muted small">A service listening in the capsule is reached at <code>{"{port}-{id}.{domain}"}</code> through this server.</p>
      <ErrorBox error={ports.error} />
      {ports.loading && !ports.data ? (
        <Spinner label="Looking for listening ports…" />
      ) : ports.data?.length ? (
        <ul class="port-list">
          {ports.data.map((p) => (
            <li key={p}><a href={link(p)} target="_blank" rel="noopener">{portHost(p, capsuleId)}</a></li>
          ))}
        </ul>
      ) : (
        <Empty>Nothing is listening on a TCP port.</Empty>
      )}
      <form class="row" onSubmit={(e) => { e.preventDefault(); window.open(link(Number(manual)), "_blank", "noopener"); }}>
        <input type="number" min={1} max={65535} placeholder="Port" value={manual} onInput={(e) => setManual(e.currentTarget.value)} required />
        <button class="btn plain" type="submit">Open port</button>
      </form>
    </section>
  );
}
