// Terminals: xterm.js tabs over the terminal channel, with lossless resume on reconnect.
import { Terminal, type ITheme } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { WebLinksAddon } from "@xterm/addon-web-links";
import type { Context } from "./context";
import { byId, el } from "./dom";
import { MESSAGES, type TerminalOutputPush, type TerminalSessionInfo, type TerminalClosePush } from "./protocol.gen";
import { ResumeTracker } from "./resume";
import type { Frame } from "./socket";

const T = MESSAGES.terminal;
const THEMES: Record<"light" | "dark", ITheme> = {
  dark: { background: "#16181d", foreground: "#d8dee9", cursor: "#d8dee9", selectionBackground: "#3b4252" },
  light: { background: "#fbfbfa", foreground: "#24292f", cursor: "#24292f", selectionBackground: "#c8d7f0" },
};

interface Session {
  id: string;
  term: Terminal;
  fit: FitAddon;
  tracker: ResumeTracker;
  pane: HTMLElement;
  tab: HTMLButtonElement;
  exited: boolean;
  label: string;
}

export class TerminalsView {
  private sessions = new Map<string, Session>();
  private active: string | null = null;
  private counter = 0;
  private readonly tabs = byId("term-tab-list");
  private readonly host = byId("term-host");
  private readonly overlay = el("div", { class: "overlay", role: "status", hidden: true, text: "reconnecting…" });
  private resizeTimer: ReturnType<typeof setTimeout> | null = null;
  private firstSessions = true;

  constructor(private readonly ctx: Context) {
    this.host.append(this.overlay);
    byId("term-new").addEventListener("click", () => this.create());
    ctx.socket.on("terminal", (frame) => this.onFrame(frame));
    ctx.socket.onState((state) => {
      this.overlay.hidden = state === "open" || state === "connecting";
    });
    ctx.onTheme((theme) => {
      for (const s of this.sessions.values()) s.term.options.theme = THEMES[theme];
    });
    new ResizeObserver(() => this.scheduleFit()).observe(this.host);
  }

  /** Called when the Terminals view becomes visible. */
  shown(focus = false): void {
    this.scheduleFit();
    if (focus) this.current()?.term.focus();
  }

  private current(): Session | undefined {
    return this.active ? this.sessions.get(this.active) : undefined;
  }

  private onFrame(frame: Frame): void {
    if (frame.type === T.sessions) this.onSessions(frame.sessions as TerminalSessionInfo[]);
    else if (frame.type === T.output) this.onOutput(frame as unknown as TerminalOutputPush);
    else if (frame.type === T.close) this.onClose(frame as unknown as TerminalClosePush);
  }

  /** Pushed on every connect: re-attach what the page shows (resuming), adopt the rest. */
  private onSessions(list: TerminalSessionInfo[]): void {
    const live = new Set(list.map((s) => s.sessionId));
    for (const session of this.sessions.values()) {
      if (session.exited) continue;
      if (live.has(session.id)) this.attach(session);
      else this.markExited(session, "session ended while disconnected");
    }
    for (const info of list) {
      if (this.sessions.has(info.sessionId) || info.exited) continue;
      this.attach(this.addSession(info.sessionId, info.command || undefined));
    }
    if (this.firstSessions && this.sessions.size === 0) this.create();
    this.firstSessions = false;
  }

  private attach(session: Session): void {
    const frame: Frame = { channel: "terminal", type: T.create, sessionId: session.id };
    const size = this.size(session);
    if (size) Object.assign(frame, size);
    const from = session.tracker.resumeFrom();
    if (from !== undefined) frame.resumeFrom = from;
    this.ctx.socket.sendIfOpen(frame);
  }

  private onOutput(frame: TerminalOutputPush): void {
    const session = this.sessions.get(frame.sessionId);
    if (!session) return;
    if (frame.truncated && session.tracker.end === null) session.term.write("\x1b[2m[earlier output dropped]\x1b[0m\r\n");
    const { text, gap } = session.tracker.accept(frame.offset, frame.data);
    if (gap > 0) session.term.write(`\r\n\x1b[2m[${gap} bytes of output were lost]\x1b[0m\r\n`);
    if (text) session.term.write(text);
  }

  private onClose(frame: TerminalClosePush): void {
    const session = this.sessions.get(frame.sessionId);
    if (!session) return;
    const how = frame.signal ? `killed by signal ${frame.signal}` : `exited with ${frame.exitCode}`;
    this.markExited(session, `process ${how}`);
  }

  private markExited(session: Session, why: string): void {
    if (session.exited) return;
    session.exited = true;
    session.term.write(`\r\n\x1b[2m[${why}]\x1b[0m\r\n`);
    session.tab.classList.add("exited");
    session.tab.title = why;
  }

  /** A new shell session in a new tab. */
  create(): void {
    let id: string;
    do id = `web-${Date.now().toString(36)}-${++this.counter}`;
    while (this.sessions.has(id));
    const session = this.addSession(id);
    const frame: Frame = { channel: "terminal", type: T.create, sessionId: id, ...this.size(session) };
    this.ctx.socket.request(frame).catch((err: Error) => {
      this.ctx.notify(`terminal: ${err.message}`, "error");
      this.markExited(session, err.message);
    });
  }

  private addSession(id: string, command?: string): Session {
    const term = new Terminal({
      scrollback: 5000,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      fontSize: 13,
      theme: THEMES[this.ctx.theme()],
      allowProposedApi: false,
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.loadAddon(new WebLinksAddon((_ev, uri) => window.open(uri, "_blank", "noopener,noreferrer")));
    const pane = el("div", { class: "term-pane", "data-session": id });
    this.host.insertBefore(pane, this.overlay);
    term.open(pane);
    const label = command ? command.slice(0, 24) : `shell ${this.sessions.size + 1}`;
    const close = el("span", { class: "close", title: "Close terminal", "aria-hidden": "true", text: "×" });
    const tab = el("button", { role: "tab", class: "term-tab", "data-session": id, "aria-selected": "false" }, label, close);
    tab.addEventListener("click", (ev) => {
      if (ev.target === close) this.closeSession(id);
      else this.select(id);
    });
    tab.addEventListener("keydown", (ev) => {
      if (ev.key === "Delete") this.closeSession(id);
    });
    this.tabs.append(tab);
    const session: Session = { id, term, fit, tracker: new ResumeTracker(), pane, tab, exited: false, label };
    term.onData((data) => {
      if (!session.exited) this.ctx.socket.send({ channel: "terminal", type: T.input, sessionId: id, data });
    });
    this.sessions.set(id, session);
    this.select(id);
    return session;
  }

  select(id: string, focus = true): void {
    this.active = id;
    for (const s of this.sessions.values()) {
      const on = s.id === id;
      s.pane.hidden = !on;
      s.tab.setAttribute("aria-selected", String(on));
      s.tab.tabIndex = on ? 0 : -1;
    }
    this.scheduleFit();
    if (focus && !byId("view-terminals").hidden) this.sessions.get(id)?.term.focus();
  }

  private closeSession(id: string): void {
    const session = this.sessions.get(id);
    if (!session) return;
    if (!session.exited) this.ctx.socket.send({ channel: "terminal", type: T.close, sessionId: id });
    session.term.dispose();
    session.pane.remove();
    session.tab.remove();
    this.sessions.delete(id);
    if (this.active === id) {
      const next = [...this.sessions.keys()].pop();
      this.active = null;
      if (next) this.select(next);
    }
  }

  private size(session: Session): { cols: number; rows: number } | undefined {
    if (session.pane.hidden || !session.pane.isConnected || session.pane.clientWidth === 0) return undefined;
    const dims = session.fit.proposeDimensions();
    if (!dims || !Number.isFinite(dims.cols) || !Number.isFinite(dims.rows)) return undefined;
    return { cols: Math.max(2, Math.min(1000, dims.cols)), rows: Math.max(1, Math.min(1000, dims.rows)) };
  }

  private scheduleFit(): void {
    if (this.resizeTimer) clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => {
      this.resizeTimer = null;
      const session = this.current();
      if (!session) return;
      const size = this.size(session);
      if (!size) return;
      if (size.cols !== session.term.cols || size.rows !== session.term.rows) {
        session.fit.fit();
        if (!session.exited) this.ctx.socket.sendIfOpen({ channel: "terminal", type: T.resize, sessionId: session.id, ...size });
      }
    }, 60);
  }

  /** For tests and debugging: the visible text of a terminal's buffer. */
  text(id?: string): string {
    const session = id ? this.sessions.get(id) : this.current();
    if (!session) return "";
    const buffer = session.term.buffer.active;
    const lines: string[] = [];
    for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i)?.translateToString(true) ?? "");
    while (lines.length && lines[lines.length - 1] === "") lines.pop();
    return lines.join("\n");
  }

  /** [cols, rows] of a terminal (the active one by default). */
  sizeOf(id?: string): [number, number] | null {
    const session = id ? this.sessions.get(id) : this.current();
    return session ? [session.term.cols, session.term.rows] : null;
  }

  ids(): string[] {
    return [...this.sessions.keys()];
  }

  activeId(): string | null {
    return this.active;
  }
}
