// Small DOM helpers shared by the views (no framework: the views are few and plain).

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<Record<string, string | boolean>> = {},
  ...children: (Node | string | null | undefined)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = String(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const node = document.getElementById(id);
  if (!node) throw new Error(`#${id} is missing`);
  return node as T;
}

/** Ask with a modal <dialog>; resolves to the chosen button's value ("" on Escape). */
export function choose(text: string, buttons: { label: string; value: string; primary?: boolean }[]): Promise<string> {
  const dialog = byId<HTMLDialogElement>("dialog");
  byId("dialog-text").textContent = text;
  const row = byId("dialog-buttons");
  row.replaceChildren(
    ...buttons.map((b) => el("button", { value: b.value, class: b.primary ? "primary" : "", text: b.label })),
  );
  dialog.returnValue = "";
  dialog.showModal();
  (row.querySelector(".primary") as HTMLButtonElement | null)?.focus();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true }));
}

export function confirmAction(text: string, action: string): Promise<boolean> {
  return choose(text, [
    { label: "Cancel", value: "cancel" },
    { label: action, value: "ok", primary: true },
  ]).then((v) => v === "ok");
}

/** The page's CSP nonce: the server puts a fresh one in a <meta> and in the
 * Content-Security-Policy header. Libraries that inject <style> elements (xterm.js's DOM
 * renderer, CodeMirror) get it, so `style-src` needs no 'unsafe-inline'. */
export function installStyleNonce(): string {
  const meta = document.querySelector('meta[name="aetherd-nonce"]');
  const nonce = meta?.getAttribute("content") ?? "";
  if (!nonce || nonce.startsWith("__")) return "";
  const create = Document.prototype.createElement;
  document.createElement = function (this: Document, tag: string, options?: ElementCreationOptions) {
    const node = create.call(this, tag, options);
    if (node instanceof HTMLStyleElement) node.nonce = nonce;
    return node;
  } as typeof document.createElement;
  return nonce;
}

export function formatSize(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB"];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}
