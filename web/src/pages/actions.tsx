// Pause / resume / snapshot / destroy for one capsule (the list's rows and the capsule page).
import { useState } from "preact/hooks";
import { type Capsule, del, post } from "../api";
import { ActionButton, Confirm, Dialog, ErrorBox, toast } from "../ui";

export function CapsuleActions({ capsule, onChange }: { capsule: Capsule; onChange: (c: Capsule | null) => void }) {
  const [dialog, setDialog] = useState<"snapshot" | "destroy" | null>(null);
  const s = capsule.status;
  const act = (verb: "pause" | "resume") => async () => {
    onChange(await post(`/v1/capsules/${capsule.id}/${verb}`));
  };
  return (
    <div class="actions">
      {s === "running" && <ActionButton onClick={act("pause")} busyLabel="Pausing…">Pause</ActionButton>}
      {s === "paused" && <ActionButton onClick={act("resume")} busyLabel="Resuming…" kind="primary">Resume</ActionButton>}
      {(s === "running" || s === "paused") && <button class="btn plain" onClick={() => setDialog("snapshot")}>Snapshot</button>}
      {s !== "stopped" && <button class="btn danger-plain" onClick={() => setDialog("destroy")}>Destroy</button>}
      {dialog === "snapshot" && <SnapshotDialog capsule={capsule} onDone={() => setDialog(null)} />}
      {dialog === "destroy" && (
        <Confirm
          title="Destroy capsule"
          label="Destroy"
          message={<>Destroy <code>{capsule.id}</code>? Its memory and disk are deleted; this cannot be undone.</>}
          action={async () => {
            await del(`/v1/capsules/${capsule.id}`);
            onChange({ ...capsule, status: "stopped" });
            toast(`${capsule.id} destroyed`);
          }}
          onDone={() => setDialog(null)}
        />
      )}
    </div>
  );
}

function SnapshotDialog({ capsule, onDone }: { capsule: Capsule; onDone: () => void }) {
  const [name, setName] = useState("");
  const [overwrite, setOverwrite] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    try {
      const body: Record<string, string> = { sandbox_id: capsule.id };
      if (name.trim()) body.name = name.trim();
      const t = await post(`/v1/snapshots?overwrite=${overwrite}`, body);
      toast(`Snapshot ${t.name} saved; the capsule is paused`);
      onDone();
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };
  return (
    <Dialog title="Snapshot capsule" onClose={onDone}>
      <form onSubmit={submit}>
        <p class="muted">Saves memory and disk as a template new capsules can start from. The capsule is left paused.</p>
        <label>
          Template name
          <input value={name} placeholder="template-… (generated if empty)" onInput={(e) => setName(e.currentTarget.value)} />
        </label>
        <label class="check">
          <input type="checkbox" checked={overwrite} onChange={(e) => setOverwrite(e.currentTarget.checked)} /> Replace a template of that name
        </label>
        <ErrorBox error={error} />
        <div class="row end">
          <button type="button" class="btn plain" onClick={onDone}>Cancel</button>
          <button type="submit" class="btn primary" disabled={busy}>{busy ? "Saving…" : "Save snapshot"}</button>
        </div>
      </form>
    </Dialog>
  );
}
