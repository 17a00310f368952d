// CodeMirror 6, assembled from its packages: the smallest set that edits with syntax
// highlighting (no autocompletion or search panels), plus lint markers for config errors.
import { EditorState, type Extension, Compartment } from "@codemirror/state";
import {
  EditorView,
  keymap,
  lineNumbers,
  highlightActiveLine,
  highlightActiveLineGutter,
  drawSelection,
} from "@codemirror/view";
import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import {
  syntaxHighlighting,
  defaultHighlightStyle,
  indentOnInput,
  bracketMatching,
  HighlightStyle,
} from "@codemirror/language";
import { tags } from "@lezer/highlight";
import { lintGutter, setDiagnostics, type Diagnostic } from "@codemirror/lint";
import { javascript } from "@codemirror/lang-javascript";
import { python } from "@codemirror/lang-python";
import { json } from "@codemirror/lang-json";
import { markdown } from "@codemirror/lang-markdown";
import { html } from "@codemirror/lang-html";
import { css } from "@codemirror/lang-css";
import { yaml } from "@codemirror/lang-yaml";

const darkHighlight = HighlightStyle.define([
  { tag: tags.keyword, color: "#c792ea" },
  { tag: [tags.string, tags.special(tags.string)], color: "#a5d6a7" },
  { tag: [tags.number, tags.bool, tags.null], color: "#f78c6c" },
  { tag: tags.comment, color: "#7f8c98", fontStyle: "italic" },
  { tag: [tags.function(tags.variableName), tags.definition(tags.variableName)], color: "#82aaff" },
  { tag: [tags.propertyName, tags.attributeName], color: "#ffcb6b" },
  { tag: [tags.typeName, tags.className, tags.tagName], color: "#89ddff" },
  { tag: tags.heading, color: "#82aaff", fontWeight: "bold" },
]);

/** The language support for a file name, or none. */
export function languageFor(path: string): Extension {
  const ext = path.toLowerCase().split(".").pop() ?? "";
  switch (ext) {
    case "js": case "mjs": case "cjs": return javascript();
    case "jsx": return javascript({ jsx: true });
    case "ts": case "mts": case "cts": return javascript({ typescript: true });
    case "tsx": return javascript({ typescript: true, jsx: true });
    case "py": case "pyi": return python();
    case "json": return json();
    case "md": case "markdown": return markdown();
    case "html": case "htm": case "vue": case "svelte": return html();
    case "css": case "scss": case "less": return css();
    case "yaml": case "yml": return yaml();
    default: return [];
  }
}

export interface EditorHandle {
  view: EditorView;
  setDoc(text: string, path: string): void;
  text(): string;
  setTheme(theme: "light" | "dark"): void;
  setErrors(errors: { line: number | null; column: number | null; message: string }[]): void;
}

export function createEditor(
  parent: HTMLElement,
  options: { theme: "light" | "dark"; onChange?: () => void; onSave?: () => void; label: string },
): EditorHandle {
  const language = new Compartment();
  const themeSlot = new Compartment();
  const themeExt = (t: "light" | "dark") => [
    EditorView.theme({}, { dark: t === "dark" }),
    syntaxHighlighting(t === "dark" ? darkHighlight : defaultHighlightStyle, { fallback: true }),
  ];
  const extensions: Extension[] = [
    lineNumbers(),
    highlightActiveLineGutter(),
    highlightActiveLine(),
    drawSelection(),
    history(),
    indentOnInput(),
    bracketMatching(),
    lintGutter(),
    keymap.of([
      { key: "Mod-s", preventDefault: true, run: () => (options.onSave?.(), true) },
      ...defaultKeymap,
      ...historyKeymap,
      indentWithTab,
    ]),
    EditorView.updateListener.of((u) => {
      if (u.docChanged) options.onChange?.();
    }),
    EditorView.contentAttributes.of({ "aria-label": options.label }),
    language.of([]),
    themeSlot.of(themeExt(options.theme)),
  ];
  const view = new EditorView({ parent, state: EditorState.create({ doc: "", extensions }) });
  return {
    view,
    setDoc(text, path) {
      view.dispatch({
        changes: { from: 0, to: view.state.doc.length, insert: text },
        effects: language.reconfigure(languageFor(path)),
      });
    },
    text: () => view.state.doc.toString(),
    setTheme: (t) => view.dispatch({ effects: themeSlot.reconfigure(themeExt(t)) }),
    setErrors(errors) {
      const doc = view.state.doc;
      const diagnostics: Diagnostic[] = errors.map((e) => {
        const line = doc.line(Math.min(Math.max(1, e.line ?? 1), doc.lines));
        const from = Math.min(line.from + Math.max(0, (e.column ?? 1) - 1), line.to);
        return { from, to: line.to > from ? line.to : from, severity: "error", message: e.message };
      });
      view.dispatch(setDiagnostics(view.state, diagnostics));
    },
  };
}
