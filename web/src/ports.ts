// Ports: the live list (ports/open, ports/close; all re-pushed on every connect), a
// preview link through the daemon's proxy, and kill behind a confirmation.
import type { Context } from "./context";
import { byId, confirmAction, el } from "./dom";
import { MESSAGES, type PortEntry } from "./protocol.gen";
import type { Frame } from "./socket";

const P = MESSAGES.ports;

export class PortsView {
  private readonly ports = new Map<number, PortEntry>();
  private readonly body = el("tbody");
  private readonly empty = el("p", { class: "muted empty", text: "No port is listening in the workspace." });

  constructor(private readonly ctx: Context) {
    const table = el(
      "table",
      { class: "ports" },
      el("thead", {}, el("tr", {}, ...["Port", "Process", "Address", ""].map((h) => el("th", { scope: "col", text: h })))),
      this.body,
    );
    byId("view-ports").append(el("div", { class: "scroll pad" }, table, this.empty));
    ctx.socket.onState((state) => {
      if (state === "open") {
        this.ports.clear(); // the daemon pushes every listening port again
        this.render();
      }
    });
    ctx.socket.on("ports", (frame) => this.onFrame(frame));
  }

  shown(): void {}

  private onFrame(frame: Frame): void {
    if (frame.type === P.open) this.ports.set(frame.port as number, frame as unknown as PortEntry);
    else if (frame.type === P.close) this.ports.delete(frame.port as number);
    else return;
    this.render();
  }

  /** The preview through the daemon's proxy; the token is exchanged for a cookie there. */
  previewUrl(port: number): string {
    return `${this.ctx.base}/ports/${port}/`;
  }

  private render(): void {
    const rows = [...this.ports.values()].sort((a, b) => a.port - b.port).map((p) => {
      const open = el("button", { type: "button", class: "primary", text: "Open preview", "data-port": String(p.port) });
      open.addEventListener("click", () => {
        const url = `${this.previewUrl(p.port)}?token=${encodeURIComponent(this.ctx.token)}`;
        window.open(url, "_blank", "noopener");
      });
      const kill = el("button", { type: "button", class: "danger", text: "Kill", "data-port": String(p.port) });
      kill.addEventListener("click", () => void this.kill(p));
      const name = p.label ? `${p.label} · ${p.process ?? "?"}` : (p.process ?? "unknown");
      return el(
        "tr",
        { "data-port": String(p.port) },
        el("td", {}, el("strong", { text: String(p.port) })),
        el("td", { title: p.command ?? "" }, name, p.pid ? el("span", { class: "muted", text: ` (pid ${p.pid})` }) : null),
        el("td", { text: `${p.address}${p.localOnly ? " (local only)" : ""}` }),
        el("td", { class: "actions" }, open, " ", kill),
      );
    });
    this.body.replaceChildren(...rows);
    this.empty.hidden = rows.length > 0;
  }

  private async kill(p: PortEntry): Promise<void> {
    const what = p.process ? `${p.process}${p.pid ? ` (pid ${p.pid})` : ""}` : "the process";
    if (!(await confirmAction(`Stop ${what}, listening on port ${p.port}? It gets SIGTERM, then SIGKILL.`, "Kill"))) return;
    try {
      await this.ctx.socket.request({ channel: "ports", type: P.kill, port: p.port });
      this.ctx.notify(`killed the process on port ${p.port}`);
    } catch (err) {
      this.ctx.notify(`kill ${p.port}: ${(err as Error).message}`, "error");
    }
  }
}
