// Config: .aether/config.yaml in CodeMirror, validated as you type (errors at their
// lines), saved with its version (a stale version is a conflict), live on disk changes.
import type { Context } from "./context";
import { byId, choose, el } from "./dom";
import { createEditor, type EditorHandle } from "./editor";
import { MESSAGES, type ConfigError, type ConfigSnapshot, type ConfigValidation } from "./protocol.gen";
import { RequestError, type Frame } from "./socket";

const C = MESSAGES.config;

export class ConfigView {
  private editor: EditorHandle | null = null;
  private version: string | null = null;
  private path = ".aether/config.yaml";
  private dirty = false;
  private loading = false;
  private validateTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly title = el("span", { class: "grow", text: "Workspace config" });
  private readonly saveButton = el("button", { type: "button", class: "primary", text: "Save", disabled: true });
  private readonly errors = el("ul", { class: "config-errors", "aria-live": "polite" });
  private readonly box = el("div", { class: "editor-box" });
  private loaded = false;

  constructor(private readonly ctx: Context) {
    const reload = el("button", { type: "button", text: "Reload" });
    reload.addEventListener("click", () => void this.load());
    this.saveButton.addEventListener("click", () => void this.save());
    byId("view-config").append(el("div", { class: "toolbar" }, this.title, reload, this.saveButton), this.errors, this.box);
    ctx.socket.on("config", (frame) => this.onPush(frame));
    ctx.socket.onState((state) => {
      if (state === "open" && this.loaded && !this.dirty) void this.load();
    });
    ctx.onTheme((t) => this.editor?.setTheme(t));
  }

  shown(): void {
    if (!this.loaded) {
      this.loaded = true;
      void this.load();
    }
  }

  private ensureEditor(): EditorHandle {
    this.editor ??= createEditor(this.box, {
      theme: this.ctx.theme(),
      label: "Workspace config (YAML)",
      onChange: () => this.changed(),
      onSave: () => void this.save(),
    });
    return this.editor;
  }

  async load(): Promise<void> {
    let snap: ConfigSnapshot;
    try {
      snap = await this.ctx.socket.request<ConfigSnapshot>({ channel: "config", type: C.get });
    } catch (err) {
      this.ctx.notify(`config: ${(err as Error).message}`, "error");
      return;
    }
    const editor = this.ensureEditor();
    this.loading = true;
    editor.setDoc(snap.raw, "config.yaml");
    this.loading = false;
    this.version = snap.version;
    this.path = snap.path;
    this.dirty = false;
    this.saveButton.disabled = true;
    this.title.textContent = snap.path;
    this.showErrors(snap.errors);
  }

  private changed(): void {
    if (this.loading) return;
    this.dirty = true;
    this.saveButton.disabled = false;
    this.title.textContent = `● ${this.path}`;
    if (this.validateTimer) clearTimeout(this.validateTimer);
    this.validateTimer = setTimeout(() => void this.validate(), 300);
  }

  private async validate(): Promise<void> {
    if (!this.editor) return;
    const raw = this.editor.text();
    try {
      const result = await this.ctx.socket.request<ConfigValidation>({ channel: "config", type: C.validate, raw });
      if (this.editor.text() === raw) this.showErrors(result.errors);
    } catch {
      // Offline: validated again on save.
    }
  }

  private showErrors(errors: ConfigError[]): void {
    this.editor?.setErrors(errors);
    this.errors.replaceChildren(
      ...errors.map((e) =>
        el("li", { class: "error", "data-line": String(e.line ?? "") }, el("strong", { text: e.line ? `line ${e.line}: ` : "" }), e.message),
      ),
    );
  }

  async save(force = false): Promise<void> {
    if (!this.editor) return;
    const frame: Frame = { channel: "config", type: C.set, raw: this.editor.text() };
    if (!force && this.version) frame.version = this.version;
    try {
      const snap = await this.ctx.socket.request<ConfigSnapshot>(frame);
      this.version = snap.version;
      this.dirty = false;
      this.saveButton.disabled = true;
      this.title.textContent = snap.path;
      this.showErrors(snap.errors);
      this.ctx.notify("config saved");
    } catch (err) {
      if (err instanceof RequestError && err.code === "INVALID_CONFIG") {
        this.showErrors((err.frame?.errors as ConfigError[] | undefined) ?? []);
        this.ctx.notify("the config is not valid: not saved", "error");
      } else if (err instanceof RequestError && err.code === "CONFLICT") {
        const choice = await choose("The config changed on disk since you loaded it.", [
          { label: "Cancel", value: "cancel" },
          { label: "Load the disk version", value: "reload" },
          { label: "Overwrite", value: "overwrite", primary: true },
        ]);
        if (choice === "overwrite") await this.save(true);
        else if (choice === "reload") await this.load();
      } else {
        this.ctx.notify(`config: ${(err as Error).message}`, "error");
      }
    }
  }

  private onPush(frame: Frame): void {
    if (frame.type !== C.changed || !this.loaded) return;
    if (frame.version === this.version) return;
    if (!this.dirty) void this.load();
    else this.ctx.notify("the config changed on disk; saving will ask what to keep");
  }
}
