// The shell: sign-in gate, top navigation, and which page a path shows.
import { useEffect, useState } from "preact/hooks";
import { currentAuth, onAuthChange, setAuth } from "./api";
import { interceptLinks, navigate, useLocation } from "./router";
import { Toasts } from "./ui";
import { SignIn } from "./pages/signin";
import { CapsulesPage } from "./pages/capsules";
import { CapsulePage } from "./pages/capsule";
import { TemplatesPage } from "./pages/templates";
import { KeysPage } from "./pages/keys";
import { TeamPage } from "./pages/team";
import { UsagePage } from "./pages/usage";

const NAV = [
  ["/capsules", "Capsules"],
  ["/templates", "Templates"],
  ["/keys", "API keys"],
  ["/team", "Team"],
  ["/usage", "Usage"],
] as const;

function useAuth() {
  const [auth, set] = useState(currentAuth());
  useEffect(() => onAuthChange(() => set(currentAuth())), []);
  return auth;
}

function Page({ path }: { path: string }) {
  const m = path.match(/^\/capsules\/(cl-[0-9a-z]+)\/?$/);
  if (m) return <CapsulePage id={m[1]} />;
  switch (path.replace(/\/$/, "") || "/") {
    case "/":
    case "/capsules":
      return <CapsulesPage />;
    case "/templates":
      return <TemplatesPage />;
    case "/keys":
      return <KeysPage />;
    case "/team":
      return <TeamPage />;
    case "/usage":
      return <UsagePage />;
    default:
      return (
        <div class="page">
          <h1>Page not found</h1>
          <p>There is no page at {path}. <a href="/capsules">Go to your capsules</a>.</p>
        </div>
      );
  }
}

export function App() {
  const auth = useAuth();
  const { path } = useLocation();
  useEffect(() => {
    document.addEventListener("click", interceptLinks);
    return () => document.removeEventListener("click", interceptLinks);
  }, []);
  if (!auth) {
    return (
      <>
        <SignIn />
        <Toasts />
      </>
    );
  }
  const who = auth.kind === "jwt" ? auth.email : `API key ${auth.key.slice(0, 8)}…`;
  const section = "/" + (path.split("/")[1] || "capsules");
  return (
    <div class="shell">
      <header class="top">
        <a class="brand" href="/capsules">Wrenn</a>
        <nav>
          {NAV.map(([href, label]) => (
            <a key={href} href={href} class={section === href ? "active" : ""} aria-current={section === href ? "page" : undefined}>
              {label}
            </a>
          ))}
        </nav>
        <div class="who">
          <span title={who}>{who}</span>
          <button
            class="btn plain"
            onClick={() => {
              setAuth(null);
              navigate("/", true);
            }}
          >
            Sign out
          </button>
        </div>
      </header>
      <main>
        <Page path={path} />
      </main>
      <Toasts />
    </div>
  );
}
