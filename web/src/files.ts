import type { Context } from "./context";
import { byId } from "./dom";

export class FilesView {
  shown(): void {}

  constructor(private readonly ctx: Context) {
    byId("view-files").textContent = "";
  }
}
