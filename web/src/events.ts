// The team's event stream (SSE). EventSource cannot send headers, so each connection opens with
// a fresh single-use ticket; on any failure it waits and connects again with a new one.
import { useEffect, useRef, useState } from "preact/hooks";
import { ticket } from "./api";

export interface TeamEvent {
  event: string;
  timestamp: string;
  resource?: { id: string; type: string };
  sandbox?: any;
  outcome?: string;
  error?: string;
  metadata?: Record<string, string>;
}

export type StreamState = "connecting" | "live" | "retrying";

const KINDS = [
  "connected", "capsule.state.changed", "capsule.create", "capsule.pause", "capsule.resume",
  "capsule.destroy", "template.snapshot.create", "template.snapshot.delete", "host.up", "host.down",
];

/** Calls `onEvent` for each event (and for `connected`, so callers can catch up after a gap). */
export function useTeamEvents(onEvent: (e: TeamEvent) => void): StreamState {
  const handler = useRef(onEvent);
  handler.current = onEvent;
  const [state, setState] = useState<StreamState>("connecting");
  useEffect(() => {
    let source: EventSource | null = null;
    let timer: number | undefined;
    let stopped = false;
    let delay = 1000;
    const open = async () => {
      if (stopped) return;
      try {
        const t = await ticket();
        if (stopped) return;
        source = new EventSource(`/api/v1/events/stream?ticket=${encodeURIComponent(t)}`);
      } catch {
        return retry();
      }
      for (const kind of KINDS) {
        source.addEventListener(kind, (msg) => {
          if (kind === "connected") {
            delay = 1000;
            setState("live");
          }
          try {
            handler.current(JSON.parse((msg as MessageEvent).data));
          } catch {
            /* a malformed event is skipped */
          }
        });
      }
      // The ticket is spent: EventSource's own reconnect would be refused, so reconnect ourselves.
      source.onerror = () => {
        source?.close();
        retry();
      };
    };
    const retry = () => {
      if (stopped) return;
      setState("retrying");
      timer = window.setTimeout(open, delay);
      delay = Math.min(delay * 2, 15000);
    };
    open();
    return () => {
      stopped = true;
      clearTimeout(timer);
      source?.close();
    };
  }, []);
  return state;
}
