// Files: a tree that follows change/resync events, CodeMirror to edit, save with
// expectedModified (and a conflict prompt), upload by drag and drop, download over HTTP.
import type { Context } from "./context";
import { byId, choose, el, formatSize } from "./dom";
import { createEditor, type EditorHandle } from "./editor";
import { MESSAGES, type FileContent, type FileEntry, type FilesChangePush, type FileWritten } from "./protocol.gen";
import { RequestError, type Frame } from "./socket";

const F = MESSAGES.files;
const MAX_EDIT = 4 * 1024 * 1024; // one read reply; larger files are for download only

function parentOf(path: string): string {
  const i = path.lastIndexOf("/");
  return i <= 0 ? "/" : path.slice(0, i);
}

function join(dir: string, name: string): string {
  return dir === "/" ? `/${name}` : `${dir}/${name}`;
}

interface Open {
  path: string;
  modified: string;
  dirty: boolean;
}

export class FilesView {
  private readonly root = byId("view-files");
  private readonly tree = el("ul", { class: "tree", role: "tree", "aria-label": "Workspace files" });
  private readonly treeBox = el("div", { class: "tree-box", tabindex: "-1" });
  private readonly title = el("span", { class: "grow file-title muted", text: "No file open" });
  private readonly saveButton = el("button", { type: "button", class: "primary", text: "Save", disabled: true, title: "Save (Ctrl+S)" });
  private readonly downloadButton = el("button", { type: "button", text: "Download", disabled: true });
  private readonly uploadInput = el("input", { type: "file", multiple: true, hidden: true, "aria-hidden": "true" });
  private readonly notice = el("div", { class: "file-notice muted", hidden: true });
  private editor: EditorHandle | null = null;
  private readonly editorBox = el("div", { class: "editor-box" });
  /** Directories whose listing is shown (expanded), with their <ul>. */
  private expanded = new Map<string, HTMLUListElement>();
  private open: Open | null = null;
  private loadedOnce = false;
  private refreshTimers = new Map<string, ReturnType<typeof setTimeout>>();

  constructor(private readonly ctx: Context) {
    const upload = el("button", { type: "button", text: "Upload…", title: "Upload files into the selected folder (or drop files on the tree)" });
    upload.addEventListener("click", () => this.uploadInput.click());
    this.uploadInput.addEventListener("change", () => {
      void this.upload(this.uploadTarget(), [...(this.uploadInput.files ?? [])]);
      this.uploadInput.value = "";
    });
    const refresh = el("button", { type: "button", text: "↻", title: "Reload the tree", "aria-label": "Reload the tree" });
    refresh.addEventListener("click", () => this.reloadAll());
    this.treeBox.append(el("div", { class: "toolbar" }, el("strong", { class: "grow", text: "Workspace" }), upload, refresh, this.uploadInput), this.tree);
    this.saveButton.addEventListener("click", () => void this.save());
    this.downloadButton.addEventListener("click", () => this.open && void this.download(this.open.path));
    const editorPane = el("div", { class: "editor-pane" }, el("div", { class: "toolbar" }, this.title, this.downloadButton, this.saveButton), this.notice, this.editorBox);
    this.root.append(el("div", { class: "split" }, this.treeBox, editorPane));
    this.setupDrop();
    ctx.socket.on("files", (frame) => this.onPush(frame));
    ctx.socket.onState((state) => {
      if (state === "open" && this.loadedOnce) this.reloadAll(); // events were missed meanwhile
    });
    ctx.onTheme((t) => this.editor?.setTheme(t));
  }

  shown(): void {
    if (!this.loadedOnce) {
      this.loadedOnce = true;
      this.expanded.set("/", this.tree);
      void this.list("/");
    }
  }

  private async list(dir: string): Promise<void> {
    const ul = this.expanded.get(dir);
    if (!ul) return;
    let entries: FileEntry[];
    try {
      entries = await this.ctx.socket.request<FileEntry[]>({ channel: "files", type: F.list, path: dir });
    } catch (err) {
      if (dir !== "/" && err instanceof RequestError && err.code === "NOT_FOUND") {
        this.expanded.delete(dir);
        return;
      }
      this.ctx.notify(`files: ${(err as Error).message}`, "error");
      return;
    }
    ul.replaceChildren(...entries.map((entry) => this.item(dir, entry)));
  }

  private item(dir: string, entry: FileEntry): HTMLLIElement {
    const path = join(dir, entry.name);
    const isDir = entry.type === "directory";
    const label = el("button", {
      type: "button",
      class: `node ${isDir ? "dir" : "file"}`,
      "data-path": path,
      title: isDir ? path : `${path} · ${formatSize(entry.size)}`,
      text: `${isDir ? "▸ " : ""}${entry.name}`,
    });
    const li = el("li", { role: "treeitem", "data-path": path }, label);
    if (isDir) {
      li.setAttribute("aria-expanded", "false");
      label.addEventListener("click", () => this.toggle(path, li, label, entry.name));
      // Re-expand what was open before a refresh.
      if (this.expanded.has(path)) {
        const child = this.expanded.get(path)!;
        li.setAttribute("aria-expanded", "true");
        label.textContent = `▾ ${entry.name}`;
        li.append(child);
      }
    } else {
      label.addEventListener("click", () => void this.openFile(path));
      const dl = el("button", { type: "button", class: "node-action", title: `Download ${entry.name}`, "aria-label": `Download ${entry.name}`, text: "⤓" });
      dl.addEventListener("click", () => void this.download(path));
      li.append(dl);
    }
    return li;
  }

  private toggle(path: string, li: HTMLLIElement, label: HTMLButtonElement, name: string): void {
    if (this.expanded.has(path)) {
      this.expanded.get(path)!.remove();
      for (const key of [...this.expanded.keys()]) if (key === path || key.startsWith(`${path}/`)) this.expanded.delete(key);
      li.setAttribute("aria-expanded", "false");
      label.textContent = `▸ ${name}`;
      return;
    }
    const ul = el("ul", { role: "group" });
    this.expanded.set(path, ul);
    li.append(ul);
    li.setAttribute("aria-expanded", "true");
    label.textContent = `▾ ${name}`;
    void this.list(path);
  }

  private onPush(frame: Frame): void {
    if (frame.type === F.resync) {
      this.reloadAll();
      return;
    }
    if (frame.type !== F.change) return;
    const change = frame as unknown as FilesChangePush;
    for (const p of [change.path, change.oldPath]) {
      if (p && this.expanded.has(parentOf(p))) this.scheduleList(parentOf(p));
    }
    if (change.action === "delete" && this.expanded.has(change.path)) this.expanded.delete(change.path);
    if (this.open && change.path === this.open.path && change.action === "modify" && !this.open.dirty) {
      void this.openFile(this.open.path, true);
    }
    if (this.open && change.path === this.open.path && change.action === "delete") {
      this.showNotice("This file was deleted on disk. Saving will create it again.");
    }
  }

  /** Coalesce bursts of events for one directory into one listing. */
  private scheduleList(dir: string): void {
    if (this.refreshTimers.has(dir)) return;
    this.refreshTimers.set(
      dir,
      setTimeout(() => {
        this.refreshTimers.delete(dir);
        void this.list(dir);
      }, 80),
    );
  }

  private reloadAll(): void {
    if (!this.loadedOnce) return;
    for (const dir of this.expanded.keys()) void this.list(dir);
  }

  private showNotice(text: string | null): void {
    this.notice.hidden = !text;
    this.notice.textContent = text ?? "";
  }

  async openFile(path: string, quiet = false): Promise<void> {
    if (!quiet && this.open?.dirty && this.open.path !== path) {
      const choice = await choose(`Discard the unsaved changes to ${this.open.path}?`, [
        { label: "Keep editing", value: "keep" },
        { label: "Discard", value: "discard", primary: true },
      ]);
      if (choice !== "discard") return;
    }
    let content: FileContent;
    try {
      content = await this.ctx.socket.request<FileContent>({ channel: "files", type: F.read, path, length: MAX_EDIT });
    } catch (err) {
      this.ctx.notify(`open ${path}: ${(err as Error).message}`, "error");
      return;
    }
    if (!this.editor) {
      this.editor = createEditor(this.editorBox, {
        theme: this.ctx.theme(),
        label: "File contents",
        onChange: () => this.markDirty(),
        onSave: () => void this.save(),
      });
    }
    this.open = null; // setDoc fires onChange; not dirty yet
    const binary = content.encoding === "base64";
    const partial = !content.eof;
    this.editor.setDoc(binary ? "" : content.content, path);
    this.open = { path, modified: content.modified, dirty: false };
    this.editor.view.contentDOM.setAttribute("contenteditable", String(!binary && !partial));
    this.showNotice(
      binary ? `Binary file (${formatSize(content.size)}): download it to view.` :
      partial ? `Large file (${formatSize(content.size)}): showing the first ${formatSize(MAX_EDIT)}, read-only.` : null,
    );
    this.title.textContent = path;
    this.title.classList.remove("muted");
    this.saveButton.disabled = true;
    this.downloadButton.disabled = false;
    for (const node of this.tree.querySelectorAll(".node.selected")) node.classList.remove("selected");
    this.tree.querySelector(`.node[data-path="${CSS.escape(path)}"]`)?.classList.add("selected");
  }

  private markDirty(): void {
    if (!this.open || this.open.dirty) return;
    this.open.dirty = true;
    this.saveButton.disabled = false;
    this.title.textContent = `● ${this.open.path}`;
  }

  async save(overwrite = false): Promise<void> {
    const open = this.open;
    if (!open || !this.editor) return;
    const frame: Frame = { channel: "files", type: F.write, path: open.path, content: this.editor.text(), encoding: "utf-8" };
    if (!overwrite) frame.expectedModified = open.modified;
    try {
      const written = await this.ctx.socket.request<FileWritten>(frame);
      open.modified = written.modified;
      open.dirty = false;
      this.saveButton.disabled = true;
      this.title.textContent = open.path;
      this.showNotice(null);
      this.ctx.notify(`saved ${open.path}`);
    } catch (err) {
      if (err instanceof RequestError && err.code === "CONFLICT") {
        const choice = await choose(
          `${open.path} changed on disk since you opened it. Overwrite it with your version, or reload the file from disk (your changes are lost)?`,
          [
            { label: "Cancel", value: "cancel" },
            { label: "Reload from disk", value: "reload" },
            { label: "Overwrite", value: "overwrite", primary: true },
          ],
        );
        if (choice === "overwrite") await this.save(true);
        else if (choice === "reload") await this.openFile(open.path, true);
        return;
      }
      this.ctx.notify(`save ${open.path}: ${(err as Error).message}`, "error");
    }
  }

  private contentUrl(path: string): string {
    return `${this.ctx.base}/files/content?path=${encodeURIComponent(path)}`;
  }

  async download(path: string): Promise<void> {
    const response = await this.ctx.http(this.contentUrl(path));
    if (!response.ok) {
      this.ctx.notify(`download ${path}: HTTP ${response.status}`, "error");
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const a = el("a", { href: url, download: path.split("/").pop() ?? "download" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 30000);
  }

  /** The folder uploads go to: the open file's folder, else the root. */
  private uploadTarget(): string {
    return this.open ? parentOf(this.open.path) : "/";
  }

  async upload(dir: string, files: File[]): Promise<void> {
    for (const file of files) {
      const path = join(dir, file.name);
      this.ctx.notify(`uploading ${path}…`);
      const response = await this.ctx.http(this.contentUrl(path), { method: "PUT", body: file });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}) as Record<string, string>);
        this.ctx.notify(`upload ${path}: ${body.error ?? `HTTP ${response.status}`}`, "error");
        return;
      }
      this.ctx.notify(`uploaded ${path}`);
    }
    if (this.expanded.has(dir)) this.scheduleList(dir);
  }

  private setupDrop(): void {
    const box = this.treeBox;
    box.addEventListener("dragover", (ev) => {
      if (!ev.dataTransfer?.types.includes("Files")) return;
      ev.preventDefault();
      box.classList.add("drop");
      for (const node of box.querySelectorAll(".drop-target")) node.classList.remove("drop-target");
      this.dropDir(ev.target)?.element?.classList.add("drop-target");
    });
    box.addEventListener("dragleave", (ev) => {
      if (ev.target === box) box.classList.remove("drop");
    });
    box.addEventListener("drop", (ev) => {
      ev.preventDefault();
      box.classList.remove("drop");
      for (const node of box.querySelectorAll(".drop-target")) node.classList.remove("drop-target");
      const files = [...(ev.dataTransfer?.files ?? [])];
      if (files.length) void this.upload(this.dropDir(ev.target)?.path ?? "/", files);
    });
  }

  /** The directory under the pointer: a folder row, or the folder of a file row. */
  private dropDir(target: EventTarget | null): { path: string; element: Element | null } | null {
    const li = (target as Element | null)?.closest?.("li[data-path]");
    if (!li) return null;
    const path = li.getAttribute("data-path")!;
    if (li.hasAttribute("aria-expanded")) return { path, element: li.firstElementChild };
    return { path: parentOf(path), element: null };
  }
}
