// The team: its members and their roles (add, remove). These routes are for signed-in users.
import { useState } from "preact/hooks";
import { currentAuth, del, get, humanError, post } from "../api";
import { Confirm, Empty, ErrorBox, Spinner, toast, useLoad, when } from "../ui";

interface Me { user: { id: string; email: string }; team: { id: string; name: string; role: string } | null }
interface Member { user_id: string; email: string; role: string; created_at: string }
interface TeamRow { id: string; name: string; role: string }

export function TeamPage() {
  const auth = currentAuth();
  if (auth?.kind !== "jwt") {
    return (
      <div class="page">
        <div class="page-head"><h1>Team</h1></div>
        <div class="card empty">
          You are signed in with an API key, which acts for one team but not for a person. Sign out and sign in
          with your email and password to see the team's members and roles.
        </div>
      </div>
    );
  }
  return <Members />;
}

function Members() {
  const me = useLoad<Me>(() => get("/v1/me"));
  const teams = useLoad<TeamRow[]>(() => get("/v1/teams"));
  const teamId = me.data?.team?.id;
  const members = useLoad<Member[]>(async () => (teamId ? get(`/v1/teams/${teamId}/members`) : []), [teamId]);
  const [email, setEmail] = useState("");
  const [role, setRole] = useState("member");
  const [removing, setRemoving] = useState<Member | null>(null);
  const manager = me.data?.team && ["owner", "admin"].includes(me.data.team.role);

  const add = async (e: Event) => {
    e.preventDefault();
    try {
      await post(`/v1/teams/${teamId}/members`, { email: email.trim(), role });
      toast(`${email} added as ${role}`);
      setEmail("");
      members.reload();
    } catch (err) {
      toast(humanError(err), "error");
    }
  };

  return (
    <div class="page">
      <div class="page-head">
        <h1>Team {me.data?.team ? `“${me.data.team.name}”` : ""}</h1>
        {me.data?.team && <span class="badge st-base">you: {me.data.team.role}</span>}
      </div>
      <ErrorBox error={me.error || members.error} onRetry={() => { me.reload(); members.reload(); }} />
      {me.loading && !me.data ? (
        <Spinner />
      ) : !teamId ? (
        <Empty>Your session has no current team; sign in again.</Empty>
      ) : (
        <>
          {manager && (
            <form class="card row" onSubmit={add} aria-label="Add member">
              <input class="grow" type="email" placeholder="Email of an existing account" value={email} onInput={(e) => setEmail(e.currentTarget.value)} required />
              <select value={role} onChange={(e) => setRole(e.currentTarget.value)} aria-label="Role">
                <option value="member">member</option>
                <option value="admin">admin</option>
                {me.data?.team?.role === "owner" && <option value="owner">owner</option>}
              </select>
              <button class="btn primary" type="submit">Add member</button>
            </form>
          )}
          {members.loading && !members.data ? (
            <Spinner label="Loading members…" />
          ) : (
            <table class="table">
              <thead><tr><th>Email</th><th>Role</th><th>Member since</th><th /></tr></thead>
              <tbody>
                {(members.data || []).map((m) => (
                  <tr key={m.user_id}>
                    <td data-label="Email">{m.email}{m.user_id === me.data?.user.id && <span class="badge st-base">you</span>}</td>
                    <td data-label="Role"><span class={`badge role-${m.role}`}>{m.role}</span></td>
                    <td data-label="Since">{when(m.created_at)}</td>
                    <td class="right">
                      {(manager || m.user_id === me.data?.user.id) && (
                        <button class="btn danger-plain" onClick={() => setRemoving(m)}>{m.user_id === me.data?.user.id ? "Leave" : "Remove"}</button>
                      )}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
          {(teams.data?.length || 0) > 1 && (
            <section class="card">
              <h2>Your teams</h2>
              <ul>
                {teams.data!.map((t) => <li key={t.id}>{t.name} <span class="muted">({t.role})</span></li>)}
              </ul>
              <p class="muted small">The dashboard acts for the team you signed in to (your oldest team).</p>
            </section>
          )}
        </>
      )}
      {removing && (
        <Confirm
          title="Remove member"
          label="Remove"
          message={<>Remove {removing.email} from the team?</>}
          action={async () => {
            await del(`/v1/teams/${teamId}/members/${removing.user_id}`);
            members.reload();
          }}
          onDone={() => setRemoving(null)}
        />
      )}
    </div>
  );
}
