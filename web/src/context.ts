import type { ReconnectingSocket } from "./socket";

/** What every view gets: the socket, the workspace, and HTTP with the token. */
export interface Context {
  socket: ReconnectingSocket;
  workspaceId: string;
  token: string;
  /** Absolute path prefix of this workspace: /workspaces/{id} */
  base: string;
  /** The theme in force ("light" | "dark"), and a way to hear about changes. */
  theme(): "light" | "dark";
  onTheme(listener: (theme: "light" | "dark") => void): void;
  /** Tell the user something went wrong (or right) without a dialog. */
  notify(text: string, kind?: "error" | "info"): void;
  /** fetch() on the daemon with the token in an Authorization header. */
  http(path: string, init?: RequestInit): Promise<Response>;
}
