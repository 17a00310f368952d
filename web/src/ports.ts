import type { Context } from "./context";
import { byId } from "./dom";

export class PortsView {
  shown(): void {}

  constructor(private readonly ctx: Context) {
    byId("view-ports").textContent = "";
  }
}
