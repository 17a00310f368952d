// Agent: the transcript (replayed history, then live events deduplicated by seq), text
// streaming in place, collapsible tool calls, approve/reject, ask_user answers, abort.
import type { Context } from "./context";
import { byId, el } from "./dom";
import { MESSAGES } from "./protocol.gen";
import type { Frame } from "./socket";

const A = MESSAGES.agent;
const FINAL = new Set(["completed", "failed", "aborted"]);

interface AgentEvent {
  type: string;
  taskId: string | null;
  seq: number;
  [field: string]: unknown;
}

interface ToolView {
  details: HTMLDetailsElement;
  summary: HTMLElement;
  state: HTMLElement;
  body: HTMLElement;
  actions: HTMLElement;
}

export class AgentView {
  private readonly log = el("div", { class: "agent-log", role: "log", "aria-live": "polite", "aria-label": "Agent transcript" });
  private readonly prompt = el("textarea", { rows: "3", placeholder: "Ask the agent… (Ctrl+Enter to send)", "aria-label": "Prompt" });
  private readonly abortButton = el("button", { type: "button", class: "danger", text: "Abort", hidden: true });
  private readonly mode = el("select", { "aria-label": "Permission mode", title: "What needs your approval" });
  private lastSeq = 0;
  private tasks = new Map<string, HTMLElement>();
  private messages = new Map<string, HTMLElement>();
  private tools = new Map<string, ToolView>();
  private running = new Set<string>();
  private settingsLoaded = false;

  constructor(private readonly ctx: Context) {
    for (const [value, label] of [["auto", "approve destructive actions"], ["ask", "approve every write and command"], ["full", "approve nothing"]]) {
      this.mode.append(el("option", { value, text: `${value}: ${label}` }));
    }
    this.mode.addEventListener("change", () => void this.setMode(this.mode.value));
    const send = el("button", { type: "submit", class: "primary", text: "Send" });
    const form = el("form", { class: "agent-form" }, this.prompt, el("div", { class: "buttons" }, this.mode, this.abortButton, send));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      void this.send();
    });
    this.prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        void this.send();
      }
    });
    this.abortButton.addEventListener("click", () => {
      for (const taskId of this.running) this.ctx.socket.send({ channel: "agent", type: A.abort, taskId });
    });
    byId("view-agent").append(this.log, form);
    ctx.socket.on("agent", (frame) => this.onFrame(frame));
  }

  shown(focus = false): void {
    if (!this.settingsLoaded) {
      this.settingsLoaded = true;
      this.ctx.socket
        .request<{ permissionMode: string }>({ channel: "agent", type: A.settings })
        .then((s) => (this.mode.value = s.permissionMode))
        .catch(() => (this.settingsLoaded = false));
    }
    if (focus) this.prompt.focus();
  }

  private async setMode(permissionMode: string): Promise<void> {
    try {
      await this.ctx.socket.request({ channel: "agent", type: A.settings, permissionMode });
      this.ctx.notify(`permission mode: ${permissionMode}`);
    } catch (err) {
      this.ctx.notify(`agent settings: ${(err as Error).message}`, "error");
    }
  }

  private async send(): Promise<void> {
    const text = this.prompt.value.trim();
    if (!text) return;
    try {
      await this.ctx.socket.request({ channel: "agent", type: A.prompt, prompt: text });
      this.prompt.value = "";
    } catch (err) {
      this.ctx.notify(`agent: ${(err as Error).message}`, "error");
    }
  }

  private onFrame(frame: Frame): void {
    if (frame.type === A.history && !("success" in frame)) {
      this.reset();
      for (const event of frame.events as AgentEvent[]) this.apply(event, true);
      this.lastSeq = Math.max(this.lastSeq, frame.latestSeq as number);
      for (const event of (frame.pending as AgentEvent[] | undefined) ?? []) this.apply(event, false, true);
      this.scroll(true);
      return;
    }
    if (frame.type === A.error) {
      this.ctx.notify(`agent: ${String(frame.error)}`, "error");
      return;
    }
    const event = frame as unknown as AgentEvent;
    if (typeof event.seq !== "number" || event.seq <= this.lastSeq) return; // seen already
    this.lastSeq = event.seq;
    this.apply(event, false);
    this.scroll(false);
  }

  private reset(): void {
    this.log.replaceChildren();
    this.tasks.clear();
    this.messages.clear();
    this.tools.clear();
    this.running.clear();
    this.lastSeq = 0;
    this.updateAbort();
  }

  private scroll(force: boolean): void {
    const near = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 80;
    if (force || near) this.log.scrollTop = this.log.scrollHeight;
  }

  private task(taskId: string | null): HTMLElement {
    const id = taskId ?? "?";
    let box = this.tasks.get(id);
    if (!box) {
      box = el("article", { class: "task", "data-task": id });
      this.tasks.set(id, box);
      this.log.append(box);
    }
    return box;
  }

  /** Fold one event into the view. `replay`: from history (answered unless pending). */
  private apply(event: AgentEvent, replay: boolean, pending = false): void {
    const box = this.task(event.taskId);
    switch (event.type) {
      case "status": {
        const status = String(event.status);
        if (status === "queued" && event.prompt) box.append(el("div", { class: "msg user", text: String(event.prompt) }));
        if (FINAL.has(status)) this.running.delete(event.taskId ?? "");
        else if (event.taskId) this.running.add(event.taskId);
        box.dataset.status = status;
        this.updateAbort();
        break;
      }
      case "text":
      case "thinking": {
        const key = `${event.type}:${String(event.messageId)}`;
        let node = this.messages.get(key);
        if (!node) {
          if (event.type === "thinking") {
            const body = el("div", { class: "thinking-body" });
            box.append(el("details", { class: "thinking" }, el("summary", { text: "Thinking" }), body));
            node = body;
          } else {
            node = el("div", { class: "msg assistant", "data-message": String(event.messageId) });
            box.append(node);
          }
          this.messages.set(key, node);
        }
        node.append(String(event.content)); // a text node per piece: streaming, no re-render
        break;
      }
      case "tool_invocation": {
        const tool = this.tool(box, event);
        const status = String(event.status);
        tool.state.textContent = status.replace("_", " ");
        tool.details.dataset.status = status;
        if (typeof event.progress === "string") {
          let out = tool.body.querySelector("pre.progress");
          if (!out) tool.body.append((out = el("pre", { class: "progress" })));
          out.append(event.progress);
        }
        if (event.name === "ask_user" && status === "awaiting_input" && (!replay || pending)) this.askUser(tool, event);
        if (status === "running") tool.actions.replaceChildren();
        break;
      }
      case "permission_request": {
        const tool = this.tool(box, event);
        tool.details.open = true;
        if (!tool.body.querySelector(".permission")) {
          tool.body.prepend(el("p", { class: "permission", text: String(event.description ?? "") }));
        }
        if (!replay || pending) this.permission(tool, String(event.requestId));
        break;
      }
      case "tool_result": {
        const tool = this.tool(box, event);
        const text = event.isError ? String(event.error ?? "error") : String(event.result ?? "");
        tool.body.append(el("pre", { class: event.isError ? "result error" : "result", text }));
        tool.state.textContent = event.isError ? "failed" : "done";
        tool.details.dataset.status = event.isError ? "failed" : "done";
        tool.actions.replaceChildren();
        break;
      }
      case "done": {
        const usage = event.usage as { inputTokens: number; outputTokens: number } | undefined;
        const parts = [`${String(event.status)}`];
        if (usage) parts.push(`${usage.inputTokens} in / ${usage.outputTokens} out tokens`);
        if (event.error) parts.push(String(event.error));
        box.append(el("div", { class: `done ${String(event.status)}`, text: parts.join(" · ") }));
        this.running.delete(event.taskId ?? "");
        for (const tool of box.querySelectorAll(".tool .actions")) tool.replaceChildren();
        this.updateAbort();
        break;
      }
      default:
        break;
    }
  }

  private tool(box: HTMLElement, event: AgentEvent): ToolView {
    const id = String(event.toolCallId);
    let tool = this.tools.get(id);
    if (!tool) {
      const state = el("span", { class: "tool-state" });
      const summary = el("summary", {}, el("code", { text: String(event.name) }), " ", state);
      const input = JSON.stringify(event.input ?? {}, null, 2);
      const body = el("div", { class: "tool-body" }, el("pre", { class: "input", text: input }));
      const actions = el("div", { class: "actions" });
      const details = el("details", { class: "tool", "data-tool": id }, summary, body, actions);
      box.append(details);
      tool = { details, summary, state, body, actions };
      this.tools.set(id, tool);
    }
    return tool;
  }

  private permission(tool: ToolView, requestId: string): void {
    const approve = el("button", { type: "button", class: "primary", text: "Approve" });
    const reject = el("button", { type: "button", class: "danger", text: "Reject" });
    const decide = async (type: string) => {
      approve.disabled = reject.disabled = true;
      try {
        await this.ctx.socket.request({ channel: "agent", type }, { requestId });
        tool.actions.replaceChildren(el("span", { class: "muted", text: type === A.approve ? "approved" : "rejected" }));
      } catch (err) {
        approve.disabled = reject.disabled = false;
        this.ctx.notify(`agent: ${(err as Error).message}`, "error");
      }
    };
    approve.addEventListener("click", () => void decide(A.approve));
    reject.addEventListener("click", () => void decide(A.reject));
    tool.actions.replaceChildren(approve, reject);
    tool.details.open = true;
  }

  private askUser(tool: ToolView, event: AgentEvent): void {
    const input = el("input", { type: "text", "aria-label": "Your answer", placeholder: "Your answer" });
    const answer = el("button", { type: "submit", class: "primary", text: "Answer" });
    const form = el("form", { class: "ask" }, input, answer);
    const question = (event.input as { question?: string } | undefined)?.question;
    if (question && !tool.body.querySelector(".question")) tool.body.append(el("p", { class: "question", text: question }));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      answer.disabled = true;
      this.ctx.socket
        .request({ channel: "agent", type: A.tool_response, toolCallId: String(event.toolCallId), result: input.value })
        .then(() => tool.actions.replaceChildren(el("span", { class: "muted", text: `answered: ${input.value}` })))
        .catch((err: Error) => {
          answer.disabled = false;
          this.ctx.notify(`agent: ${err.message}`, "error");
        });
    });
    tool.actions.replaceChildren(form);
    tool.details.open = true;
  }

  private updateAbort(): void {
    this.abortButton.hidden = this.running.size === 0;
  }
}
