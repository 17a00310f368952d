// The aetherd console: one page, one WebSocket, five views.
import "@xterm/xterm/css/xterm.css";
import "./style.css";
import { forgetToken, storeToken, takeToken } from "./auth";
import type { Context } from "./context";
import { byId, installStyleNonce } from "./dom";
import { ReconnectingSocket } from "./socket";
import { TerminalsView } from "./terminals";
import { FilesView } from "./files";
import { AgentView } from "./agent";
import { PortsView } from "./ports";
import { ConfigView } from "./config";

type Theme = "light" | "dark";
type ThemeChoice = "auto" | Theme;
const VIEWS = ["terminals", "files", "agent", "ports", "config"] as const;
type ViewName = (typeof VIEWS)[number];

interface View {
  /** The view became visible; `focus`: move the focus into it (not when the user is
   * moving between the view tabs with the arrow keys). */
  shown?(focus: boolean): void;
}

function workspaceId(): string {
  const meta = document.querySelector('meta[name="aetherd-workspace"]')?.getAttribute("content");
  if (meta && !meta.startsWith("__")) return meta;
  const match = /^\/workspaces\/([^/]+)\//.exec(location.pathname);
  return match ? decodeURIComponent(match[1]) : "local";
}

function setupTheme(): { theme(): Theme; onTheme(l: (t: Theme) => void): void } {
  const listeners: ((t: Theme) => void)[] = [];
  const media = window.matchMedia("(prefers-color-scheme: dark)");
  let choice = (localStorage.getItem("aetherd.theme") as ThemeChoice | null) ?? "auto";
  const resolve = (): Theme => (choice === "auto" ? (media.matches ? "dark" : "light") : choice);
  const apply = () => {
    const theme = resolve();
    document.documentElement.dataset.theme = theme;
    const button = byId("theme");
    button.title = `Theme: ${choice}`;
    button.setAttribute("aria-label", `Theme: ${choice} (switch)`);
    for (const l of listeners) l(theme);
  };
  media.addEventListener("change", apply);
  byId("theme").addEventListener("click", () => {
    choice = choice === "auto" ? "dark" : choice === "dark" ? "light" : "auto";
    localStorage.setItem("aetherd.theme", choice);
    apply();
  });
  apply();
  return { theme: resolve, onTheme: (l) => listeners.push(l) };
}

function askForToken(): Promise<string> {
  const form = byId<HTMLFormElement>("login");
  form.hidden = false;
  byId("login-token").focus();
  return new Promise((resolve) =>
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = byId<HTMLInputElement>("login-token").value.trim();
      if (!value) return;
      form.hidden = true;
      storeToken(sessionStorage, value);
      resolve(value);
    }),
  );
}

function setupTabs(views: Record<ViewName, View>): void {
  const buttons = VIEWS.map((name) => byId<HTMLButtonElement>(`tab-${name}`));
  const select = (name: ViewName, focus = false) => {
    for (const [i, view] of VIEWS.entries()) {
      const on = view === name;
      buttons[i].setAttribute("aria-selected", String(on));
      buttons[i].tabIndex = on ? 0 : -1;
      byId(`view-${view}`).hidden = !on;
    }
    if (focus) buttons[VIEWS.indexOf(name)].focus();
    views[name].shown?.(!focus);
    history.replaceState(null, "", `${location.pathname}${location.search}${name === "terminals" ? "" : `#${name}`}`);
  };
  for (const [i, button] of buttons.entries()) {
    button.addEventListener("click", () => select(VIEWS[i]));
    button.addEventListener("keydown", (ev) => {
      const step = ev.key === "ArrowRight" ? 1 : ev.key === "ArrowLeft" ? -1 : 0;
      if (step) select(VIEWS[(i + step + VIEWS.length) % VIEWS.length], true);
    });
  }
  const initial = location.hash.replace("#", "") as ViewName;
  select(VIEWS.includes(initial) ? initial : "terminals");
}

async function main(): Promise<void> {
  installStyleNonce();
  const themes = setupTheme();
  const id = workspaceId();
  const base = `/workspaces/${encodeURIComponent(id)}`;
  let token = takeToken(location, sessionStorage, history) ?? (await askForToken());
  const status = byId("status");
  const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${base}/ws`;
  const socket = new ReconnectingSocket({ url: wsUrl, token });
  let notifyTimer: ReturnType<typeof setTimeout> | null = null;
  const ctx: Context = {
    socket,
    workspaceId: id,
    token,
    base,
    theme: themes.theme,
    onTheme: themes.onTheme,
    notify(text, kind = "info") {
      status.textContent = text;
      status.dataset.kind = kind;
      if (notifyTimer) clearTimeout(notifyTimer);
      notifyTimer = setTimeout(() => showState(), 6000);
    },
    http(path, init = {}) {
      const headers = new Headers(init.headers);
      headers.set("Authorization", `Bearer ${token}`);
      return fetch(path.startsWith("/") ? path : `${base}/${path}`, { ...init, headers });
    },
  };
  const showState = () => {
    const s = socket.state;
    status.textContent = s === "open" ? "connected" : s === "reconnecting" ? "reconnecting…" : s === "connecting" ? "connecting…" : "disconnected";
    status.dataset.kind = s === "open" ? "ok" : "warn";
    document.body.dataset.connection = s;
  };
  socket.onState(() => showState());
  // A bad token gets 401 before the upgrade, which a browser reports only as a close
  // (1006). After a few failed attempts with no success, ask whether the token is right.
  let failures = 0;
  socket.onState((state) => {
    if (state === "open") failures = 0;
    else if (state === "reconnecting" && socket.connections === 0 && ++failures === 4) {
      void ctx.http(`${base}/info`).then((r) => {
        if (r.status === 401) {
          socket.stop();
          forgetToken(sessionStorage);
          status.textContent = "the token was refused";
          void askForToken().then((t) => {
            token = t;
            ctx.token = t;
            location.reload();
          });
        }
      });
    }
  });
  const terminals = new TerminalsView(ctx);
  const views: Record<ViewName, View> = {
    terminals,
    files: new FilesView(ctx),
    agent: new AgentView(ctx),
    ports: new PortsView(ctx),
    config: new ConfigView(ctx),
  };
  setupTabs(views);
  socket.start();
  // A small, read-only handle for the browser tests and for debugging from the devtools.
  (window as unknown as Record<string, unknown>).aetherdConsole = {
    terminalText: (sessionId?: string) => terminals.text(sessionId),
    terminalIds: () => terminals.ids(),
    activeTerminal: () => terminals.activeId(),
    terminalSize: (sessionId?: string) => terminals.sizeOf(sessionId),
    connections: () => socket.connections,
    state: () => socket.state,
  };
}

void main();
