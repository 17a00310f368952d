import type { Context } from "./context";
import { byId } from "./dom";

export class ConfigView {
  shown(): void {}

  constructor(private readonly ctx: Context) {
    byId("view-config").textContent = "";
  }
}
