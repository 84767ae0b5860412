// Templates: the built-in ones and the team's snapshots (delete); start a capsule from one; builds.
import { useState } from "preact/hooks";
import { type Template, del, get } from "../api";
import { useTeamEvents } from "../events";
import { BuildsSection } from "./builds";
import { Confirm, Empty, ErrorBox, Spinner, bytes, when, useLoad } from "../ui";

export function TemplatesPage() {
  const templates = useLoad<Template[]>(() => get("/v1/snapshots"));
  const [removing, setRemoving] = useState<Template | null>(null);
  useTeamEvents((e) => {
    if (e.event.startsWith("template.")) templates.reload();
  });
  const list = templates.data || [];
  return (
    <div class="page">
      <div class="page-head"><h1>Templates</h1></div>
      <p class="muted">Capsules start from a template. Snapshot a running or paused capsule (on its page), or build one from a Dockerfile below, to make your own.</p>
      <ErrorBox error={templates.error} onRetry={templates.reload} />
      {templates.loading && !templates.data ? (
        <Spinner label="Loading templates…" />
      ) : list.length === 0 ? (
        <Empty>No templates.</Empty>
      ) : (
        <table class="table">
          <thead><tr><th>Name</th><th>Type</th><th>vCPUs</th><th>Memory</th><th>Size</th><th>Created</th><th /></tr></thead>
          <tbody>
            {list.map((t) => (
              <tr key={t.name} data-template={t.name}>
                <td data-label="Name" class="mono">{t.name}</td>
                <td data-label="Type"><span class={`badge ${t.type === "base" ? "st-base" : "st-snapshot"}`}>{t.type === "base" ? "built-in" : "snapshot"}</span></td>
                <td data-label="vCPUs">{t.vcpus}</td>
                <td data-label="Memory">{t.memory_mb} MiB</td>
                <td data-label="Size">{t.size_bytes ? bytes(t.size_bytes) : "–"}</td>
                <td data-label="Created">{when(t.created_at)}</td>
                <td class="right">
                  <a class="btn plain" href={`/capsules?new&template=${encodeURIComponent(t.name)}`}>New capsule</a>
                  {t.type === "snapshot" && <button class="btn danger-plain" onClick={() => setRemoving(t)}>Delete</button>}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {removing && (
        <Confirm
          title="Delete snapshot"
          message={<>Delete the snapshot <code>{removing.name}</code>? Capsules already made from it keep running.</>}
          action={async () => {
            await del(`/v1/snapshots/${encodeURIComponent(removing.name)}`);
            templates.reload();
          }}
          onDone={() => setRemoving(null)}
        />
      )}
      <BuildsSection onBuilt={templates.reload} />
    </div>
  );
}
