// The capsule's files: browse, upload by drag and drop (or a picker), download, mkdir, delete.
import { useState } from "preact/hooks";
import { type FileEntry, humanError, post, request } from "../api";
import { ActionButton, Confirm, ErrorBox, Spinner, bytes, toast, useLoad } from "../ui";

const join = (dir: string, name: string) => (dir.endsWith("/") ? dir : dir + "/") + name;
const parent = (dir: string) => dir.replace(/\/[^/]+\/?$/, "") || "/";

export function FilesPane({ capsuleId }: { capsuleId: string }) {
  const [dir, setDir] = useState("/root");
  const [over, setOver] = useState(false);
  const [uploading, setUploading] = useState<string | null>(null);
  const [newDir, setNewDir] = useState<string | null>(null);
  const [removing, setRemoving] = useState<FileEntry | null>(null);
  const base = `/v1/capsules/${capsuleId}/files`;
  const listing = useLoad<FileEntry[]>(async () => {
    const out = await post(`${base}/list`, { path: dir, depth: 1 });
    return (out.entries as FileEntry[]).sort((a, b) =>
      a.type === b.type ? a.name.localeCompare(b.name) : a.type === "directory" ? -1 : b.type === "directory" ? 1 : a.name.localeCompare(b.name));
  }, [capsuleId, dir]);

  const upload = async (files: FileList | File[]) => {
    for (const file of Array.from(files)) {
      setUploading(file.name);
      try {
        const form = new FormData();
        form.append("path", join(dir, file.name));
        form.append("file", file, file.name);
        await request("POST", `${base}/write`, form);
        toast(`Uploaded ${file.name}`);
      } catch (e) {
        toast(`Could not upload ${file.name}: ${humanError(e)}`, "error");
      }
    }
    setUploading(null);
    listing.reload();
  };

  const download = async (entry: FileEntry) => {
    const resp: Response = await request("POST", `${base}/stream/read`, { path: entry.path }, { raw: true });
    const url = URL.createObjectURL(await resp.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = entry.name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  };

  const crumbs = dir.split("/").filter(Boolean);
  return (
    <div
      class={`files ${over ? "drop-over" : ""}`}
      data-testid="dropzone"
      onDragOver={(e) => {
        e.preventDefault();
        setOver(true);
      }}
      onDragLeave={(e) => {
        if (e.currentTarget === e.target) setOver(false);
      }}
      onDrop={(e) => {
        e.preventDefault();
        setOver(false);
        if (e.dataTransfer?.files?.length) upload(e.dataTransfer.files);
      }}
    >
      <div class="toolbar">
        <nav class="crumbs" aria-label="Path">
          <button class="link" onClick={() => setDir("/")}>/</button>
          {crumbs.map((c, i) => (
            <span key={i}>
              <button class="link" onClick={() => setDir("/" + crumbs.slice(0, i + 1).join("/"))}>{c}</button>
              {i < crumbs.length - 1 && "/"}
            </span>
          ))}
        </nav>
        <div class="grow" />
        <button class="btn plain" disabled={dir === "/"} onClick={() => setDir(parent(dir))}>Up</button>
        <button class="btn plain" onClick={() => setNewDir("")}>New folder</button>
        <label class="btn plain">
          Upload
          <input type="file" multiple hidden onChange={(e) => e.currentTarget.files && upload(e.currentTarget.files)} />
        </label>
        <button class="btn plain" onClick={listing.reload}>Refresh</button>
      </div>
      {newDir !== null && (
        <form
          class="row"
          onSubmit={async (e) => {
            e.preventDefault();
            try {
              await post(`${base}/mkdir`, { path: join(dir, newDir.trim()) });
              setNewDir(null);
              listing.reload();
            } catch (err) {
              toast(humanError(err), "error");
            }
          }}
        >
          <input autoFocus placeholder="Folder name" value={newDir} onInput={(e) => setNewDir(e.currentTarget.value)} required />
          <button class="btn primary" type="submit">Create</button>
          <button class="btn plain" type="button" onClick={() => setNewDir(null)}>Cancel</button>
        </form>
      )}
      {uploading && <Spinner label={`Uploading ${uploading}…`} />}
      <ErrorBox error={listing.error} onRetry={listing.reload} />
      {listing.error && dir !== "/" && <button class="link" onClick={() => setDir("/")}>Go to /</button>}
      {listing.loading && !listing.data ? (
        <Spinner label="Listing…" />
      ) : (
        <table class="table files-table">
          <thead>
            <tr><th>Name</th><th>Size</th><th>Modified</th><th>Permissions</th><th /></tr>
          </thead>
          <tbody>
            {(listing.data || []).map((f) => (
              <tr key={f.path} data-file={f.name}>
                <td data-label="Name">
                  {f.type === "directory" ? (
                    <button class="link" onClick={() => setDir(f.path)}><span class="ficon dir" aria-hidden="true" />{f.name}</button>
                  ) : (
                    <span><span class={`ficon ${f.type}`} aria-hidden="true" />{f.name}{f.symlink_target ? ` → ${f.symlink_target}` : ""}</span>
                  )}
                </td>
                <td data-label="Size">{f.type === "file" ? bytes(f.size) : ""}</td>
                <td data-label="Modified">{f.modified_at ? new Date(f.modified_at * 1000).toLocaleString() : ""}</td>
                <td data-label="Permissions" class="mono">{f.permissions}</td>
                <td class="right">
                  {f.type === "file" && <ActionButton onClick={() => download(f)} busyLabel="…">Download</ActionButton>}
                  <button class="btn danger-plain" onClick={() => setRemoving(f)}>Delete</button>
                </td>
              </tr>
            ))}
            {listing.data?.length === 0 && (
              <tr><td colSpan={5} class="empty">Empty folder. Drop files here to upload them.</td></tr>
            )}
          </tbody>
        </table>
      )}
      <p class="muted small">Drop files anywhere on this panel to upload them to {dir}.</p>
      {removing && (
        <Confirm
          title="Delete"
          message={<>Delete <code>{removing.path}</code>{removing.type === "directory" ? " and everything in it" : ""}?</>}
          action={async () => {
            await post(`${base}/remove`, { path: removing.path });
            listing.reload();
          }}
          onDone={() => setRemoving(null)}
        />
      )}
    </div>
  );
}
