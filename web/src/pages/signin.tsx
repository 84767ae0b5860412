// Sign in with email and password (a JWT from the accounts routes) or by pasting an API key.
import { useState } from "preact/hooks";
import { type Auth, humanError, request, setAuth, signOutReason } from "../api";

export function SignIn() {
  const [mode, setMode] = useState<"key" | "password" | "signup">("key");
  const [key, setKey] = useState("");
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState<string | null>(signOutReason);
  const [busy, setBusy] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      let auth: Auth;
      if (mode === "key") {
        const k = key.trim();
        if (!/^wrn_[0-9a-f]{32}$/.test(k)) throw new Error("An API key looks like wrn_ followed by 32 hex digits");
        auth = { kind: "key", key: k };
        await request("GET", "/v1/capsules", undefined, { auth }); // proves the key works
      } else {
        const path = mode === "signup" ? "/v1/auth/signup" : "/v1/auth/login";
        const out = await request("POST", path, { email, password }, { auth: null });
        auth = { kind: "jwt", token: out.token, email: email.trim().toLowerCase() };
      }
      setAuth(auth);
    } catch (err) {
      setError(humanError(err));
      setBusy(false);
    }
  };

  return (
    <div class="signin">
      <form class="card" onSubmit={submit}>
        <h1>Wrenn</h1>
        <p class="muted">Capsules on your own host.</p>
        <div class="tabs" role="tablist">
          {(["key", "password", "signup"] as const).map((m) => (
            <button type="button" role="tab" aria-selected={mode === m} class={mode === m ? "active" : ""} onClick={() => setMode(m)}>
              {m === "key" ? "API key" : m === "password" ? "Email" : "New account"}
            </button>
          ))}
        </div>
        {mode === "key" ? (
          <label>
            API key
            <input name="api_key" type="password" autocomplete="off" placeholder="wrn_…" value={key} onInput={(e) => setKey(e.currentTarget.value)} required />
            <small class="muted">The key <code>wrenn server</code> printed at its first start, or one made on the API keys page.</small>
          </label>
        ) : (
          <>
            <label>
              Email
              <input name="email" type="email" autocomplete="username" value={email} onInput={(e) => setEmail(e.currentTarget.value)} required />
            </label>
            <label>
              Password
              <input name="password" type="password" autocomplete={mode === "signup" ? "new-password" : "current-password"} minLength={mode === "signup" ? 8 : undefined}
                value={password} onInput={(e) => setPassword(e.currentTarget.value)} required />
            </label>
          </>
        )}
        {error && <div class="error" role="alert">{error}</div>}
        <button class="btn primary wide" type="submit" disabled={busy}>
          {busy ? "Signing in…" : mode === "signup" ? "Create account" : "Sign in"}
        </button>
      </form>
    </div>
  );
}
