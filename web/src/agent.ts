import type { Context } from "./context";
import { byId } from "./dom";

export class AgentView {
  shown(): void {}

  constructor(private readonly ctx: Context) {
    byId("view-agent").textContent = "";
  }
}
