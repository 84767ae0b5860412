// API keys: list, create (the full key is shown once, with a copy button), delete.
import { useState } from "preact/hooks";
import { type ApiKey, currentAuth, del, get, humanError, post, setAuth } from "../api";
import { Confirm, Empty, ErrorBox, Spinner, copyText, toast, useLoad, when } from "../ui";

export function KeysPage() {
  const keys = useLoad<ApiKey[]>(() => get("/v1/api-keys"));
  const [name, setName] = useState("");
  const [busy, setBusy] = useState(false);
  const [created, setCreated] = useState<{ name: string; key: string } | null>(null);
  const [copied, setCopied] = useState(false);
  const [removing, setRemoving] = useState<ApiKey | null>(null);
  const auth = currentAuth();
  const mine = (k: ApiKey) => auth?.kind === "key" && auth.key.startsWith(k.prefix);

  const create = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    try {
      const out = await post("/v1/api-keys", name.trim() ? { name: name.trim() } : {});
      setCreated({ name: out.name, key: out.key });
      setCopied(false);
      setName("");
      keys.reload();
    } catch (err) {
      toast(humanError(err), "error");
    } finally {
      setBusy(false);
    }
  };

  return (
    <div class="page">
      <div class="page-head"><h1>API keys</h1></div>
      <p class="muted">Keys let the SDK, the CLI and scripts act for this team (header <code>X-API-Key</code>). Only a hash is stored.</p>
      <form class="card row" onSubmit={create} aria-label="New API key">
        <input class="grow" name="key_name" placeholder="Key name, e.g. ci" value={name} onInput={(e) => setName(e.currentTarget.value)} maxLength={200} />
        <button class="btn primary" type="submit" disabled={busy}>{busy ? "Creating…" : "Create key"}</button>
      </form>
      {created && (
        <div class="card secret" role="status" data-testid="new-key">
          <strong>New key “{created.name}”</strong>
          <p>Copy it now: this is the only time it is shown.</p>
          <div class="row">
            <code class="grow key">{created.key}</code>
            <button class="btn primary" onClick={async () => setCopied(await copyText(created.key))}>{copied ? "Copied" : "Copy"}</button>
            <button class="btn plain" onClick={() => setCreated(null)}>Done</button>
          </div>
        </div>
      )}
      <ErrorBox error={keys.error} onRetry={keys.reload} />
      {keys.loading && !keys.data ? (
        <Spinner label="Loading keys…" />
      ) : !keys.data?.length ? (
        <Empty>No keys.</Empty>
      ) : (
        <table class="table">
          <thead><tr><th>Name</th><th>Key</th><th>Created</th><th /></tr></thead>
          <tbody>
            {keys.data.map((k) => (
              <tr key={k.id} data-key={k.name}>
                <td data-label="Name">{k.name}{mine(k) && <span class="badge st-base">this session</span>}</td>
                <td data-label="Key" class="mono">{k.prefix}…</td>
                <td data-label="Created">{when(k.created_at)}</td>
                <td class="right"><button class="btn danger-plain" onClick={() => setRemoving(k)}>Delete</button></td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {removing && (
        <Confirm
          title="Delete API key"
          message={
            <>
              Delete the key “{removing.name}” (<code>{removing.prefix}…</code>)? Anything using it stops working at once.
              {mine(removing) && <strong> You are signed in with this key: you will be signed out.</strong>}
            </>
          }
          action={async () => {
            await del(`/v1/api-keys/${removing.id}`);
            if (mine(removing)) setAuth(null, "The key you signed in with was deleted.");
            else keys.reload();
          }}
          onDone={() => setRemoving(null)}
        />
      )}
    </div>
  );
}
