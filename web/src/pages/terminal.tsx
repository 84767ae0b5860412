// An xterm.js terminal on the capsule's PTY WebSocket. The session lives in the capsule: its tag
// is kept in sessionStorage, so a reload (or a dropped socket) re-attaches with `connect` and the
// server replays the recent output.
import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { humanError, ticket, wsUrl } from "../api";

type State = "connecting" | "connected" | "closed" | "exited";

const tagKey = (id: string) => `wrenn.pty.${id}`;

export function TerminalPane({ capsuleId, visible }: { capsuleId: string; visible: boolean }) {
  const box = useRef<HTMLDivElement>(null);
  const fitRef = useRef<FitAddon | null>(null);
  const [state, setState] = useState<State>("connecting");
  const [message, setMessage] = useState<string | null>(null);
  const [generation, setGeneration] = useState(0); // bump to start over (new shell / reconnect)

  useEffect(() => {
    const term = new Terminal({
      cursorBlink: true,
      fontSize: 14,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, monospace',
      scrollback: 5000,
      theme: { background: "#11161d", foreground: "#d8dee9" },
    });
    const fit = new FitAddon();
    fitRef.current = fit;
    term.loadAddon(fit);
    term.open(box.current!);
    try {
      fit.fit();
    } catch {
      /* not laid out yet */
    }
    const enc = new TextEncoder();
    let ws: WebSocket | null = null;
    let disposed = false;
    let attempt = 0;
    let retry: number | undefined;

    const send = (msg: object) => ws?.readyState === WebSocket.OPEN && ws.send(JSON.stringify(msg));

    const connect = async () => {
      setState("connecting");
      let t: string;
      try {
        t = await ticket();
      } catch (e) {
        setMessage(humanError(e));
        setState("closed");
        return;
      }
      if (disposed) return;
      const tag = sessionStorage.getItem(tagKey(capsuleId));
      const sock = new WebSocket(wsUrl(`/v1/capsules/${capsuleId}/pty`, t));
      ws = sock;
      sock.binaryType = "arraybuffer";
      sock.onopen = () => {
        if (tag) {
          term.reset(); // the server replays the session's recent output
          send({ type: "connect", tag });
        } else {
          send({ type: "start", cmd: "/bin/bash", args: ["-l"], cols: term.cols, rows: term.rows, envs: { TERM: "xterm-256color" } });
        }
      };
      sock.onmessage = (ev) => {
        if (ev.data instanceof ArrayBuffer) {
          term.write(new Uint8Array(ev.data));
          return;
        }
        const msg = JSON.parse(ev.data);
        if (msg.type === "started") {
          sessionStorage.setItem(tagKey(capsuleId), msg.tag);
          attempt = 0;
          setMessage(null);
          setState("connected");
          send({ type: "resize", cols: term.cols, rows: term.rows });
          term.focus();
        } else if (msg.type === "exit") {
          sessionStorage.removeItem(tagKey(capsuleId));
          term.write(`\r\n\x1b[2m[shell exited with code ${msg.exit_code}]\x1b[0m\r\n`);
          setState("exited");
        } else if (msg.type === "ping") {
          send({ type: "pong" });
        } else if (msg.type === "error") {
          if (tag && msg.fatal) sessionStorage.removeItem(tagKey(capsuleId)); // that session is gone: start anew
          else setMessage(msg.data);
        }
      };
      sock.onclose = () => {
        if (disposed || ws !== sock) return;
        setState((s) => (s === "exited" ? s : "closed"));
        // Dropped (or the old session was gone): try again a few times, re-attaching by tag.
        if (sessionStorage.getItem(tagKey(capsuleId)) !== null || attempt === 0) {
          if (attempt++ < 5) retry = window.setTimeout(connect, Math.min(500 * 2 ** attempt, 5000));
        }
      };
    };

    const input = term.onData((d) => ws?.readyState === WebSocket.OPEN && ws.send(enc.encode(d)));
    const resized = term.onResize(({ cols, rows }) => send({ type: "resize", cols, rows }));
    const ro = new ResizeObserver(() => {
      try {
        if (box.current?.offsetParent) fit.fit();
      } catch {
        /* hidden */
      }
    });
    ro.observe(box.current!);
    connect();
    return () => {
      disposed = true;
      clearTimeout(retry);
      ro.disconnect();
      input.dispose();
      resized.dispose();
      ws?.close(); // the shell keeps running in the capsule; a later visit re-attaches
      term.dispose();
    };
  }, [capsuleId, generation]);

  useEffect(() => {
    if (visible) requestAnimationFrame(() => fitRef.current?.fit());
  }, [visible]);

  return (
    <div class="terminal-pane">
      <div class="term-bar">
        <span class={`term-state ${state}`} data-testid="terminal-state">
          {state === "connected" ? "Connected" : state === "connecting" ? "Connecting…" : state === "exited" ? "Shell exited" : "Disconnected"}
        </span>
        {message && <span class="error inline">{message}</span>}
        <div class="grow" />
        {(state === "closed" || state === "exited") && (
          <button class="btn plain" onClick={() => setGeneration((g) => g + 1)}>{state === "exited" ? "New shell" : "Reconnect"}</button>
        )}
        {state === "connected" && (
          <button
            class="btn plain"
            title="End this shell and start a new one"
            onClick={() => {
              sessionStorage.removeItem(tagKey(capsuleId));
              setGeneration((g) => g + 1);
            }}
          >
            New shell
          </button>
        )}
      </div>
      <div class="terminal" ref={box} data-testid="terminal" />
    </div>
  );
}
