import { describe, expect, it } from "vitest";
import { ReconnectingSocket, RequestError, backoffDelay, type WebSocketLike } from "../src/socket";

class FakeWs implements WebSocketLike {
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  sent: string[] = [];
  constructor(readonly url: string, readonly protocols: string[]) {}
  send(data: string) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(data);
  }
  close() {
    this.drop(1000);
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  push(frame: object) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
}

function harness() {
  const sockets: FakeWs[] = [];
  const timers: { fn: () => void; ms: number; id: number }[] = [];
  let nextTimer = 0;
  const socket = new ReconnectingSocket({
    url: "ws://host/workspaces/w/ws",
    token: "secret",
    factory: (url, protocols) => {
      const ws = new FakeWs(url, protocols);
      sockets.push(ws);
      return ws;
    },
    random: () => 1,
    minDelay: 100,
    maxDelay: 800,
    maxQueued: 3,
    setTimer: (fn, ms) => {
      const id = ++nextTimer;
      timers.push({ fn, ms, id });
      return id;
    },
    clearTimer: (id) => {
      const i = timers.findIndex((t) => t.id === id);
      if (i >= 0) timers.splice(i, 1);
    },
  });
  const fire = () => {
    const t = timers.shift();
    if (!t) throw new Error("no timer pending");
    t.fn();
    return t.ms;
  };
  return { socket, sockets, timers, fire };
}

describe("ReconnectingSocket", () => {
  it("authenticates with the subprotocol form, never the URL", () => {
    const { socket, sockets } = harness();
    socket.start();
    expect(sockets[0].protocols).toEqual(["bearer", "secret"]);
    expect(sockets[0].url).not.toContain("secret");
  });

  it("reconnects with growing, capped delays and reports its state", () => {
    const { socket, sockets, timers, fire } = harness();
    const states: string[] = [];
    socket.onState((s) => states.push(s));
    socket.start();
    sockets[0].open();
    sockets[0].drop();
    expect(socket.state).toBe("reconnecting");
    const delays = [];
    for (let i = 0; i < 5; i++) {
      delays.push(fire());
      sockets[sockets.length - 1].drop();
    }
    expect(delays).toEqual([100, 200, 400, 800, 800]);
    fire();
    sockets[sockets.length - 1].open();
    expect(socket.state).toBe("open");
    expect(socket.connections).toBe(2);
    expect(states[0]).toBe("connecting");
    expect(states).toContain("reconnecting");
    // After a success the backoff starts again from the minimum.
    sockets[sockets.length - 1].drop();
    expect(timers[0].ms).toBe(100);
  });

  it("queues frames while disconnected, keeps only the newest, sends them on open", () => {
    const { socket, sockets, fire } = harness();
    socket.start();
    sockets[0].open();
    sockets[0].drop();
    for (let i = 0; i < 5; i++) socket.send({ channel: "terminal", type: "input", data: String(i) });
    expect(socket.queued).toBe(3);
    expect(socket.sendIfOpen({ channel: "terminal", type: "resize" })).toBe(false);
    fire();
    sockets[1].open();
    expect(sockets[1].sent.map((s) => JSON.parse(s).data)).toEqual(["2", "3", "4"]);
    expect(socket.queued).toBe(0);
  });

  it("matches replies by requestId and routes pushes to channel listeners", async () => {
    const { socket, sockets } = harness();
    const pushed: string[] = [];
    socket.on("files", (f) => pushed.push(f.type));
    socket.start();
    sockets[0].open();
    const ok = socket.request<{ path: string }>({ channel: "files", type: "stat", path: "/a" });
    const bad = socket.request({ channel: "files", type: "read", path: "/b" });
    const [first, second] = sockets[0].sent.map((s) => JSON.parse(s));
    sockets[0].push({ channel: "files", type: "change", action: "create", path: "/c" });
    sockets[0].push({ channel: "files", type: "read", requestId: second.requestId, success: false, error: "no", code: "NOT_FOUND" });
    sockets[0].push({ channel: "files", type: "stat", requestId: first.requestId, success: true, data: { path: "/a" } });
    await expect(ok).resolves.toEqual({ path: "/a" });
    await expect(bad).rejects.toMatchObject({ code: "NOT_FOUND" });
    expect(pushed).toEqual(["change"]);
  });

  it("fails requests in flight when the connection drops", async () => {
    const { socket, sockets } = harness();
    socket.start();
    sockets[0].open();
    const waiting = socket.request({ channel: "config", type: "get" });
    sockets[0].drop();
    await expect(waiting).rejects.toBeInstanceOf(RequestError);
    await expect(waiting).rejects.toMatchObject({ code: "DISCONNECTED" });
  });

  it("stops for good when stopped", () => {
    const { socket, sockets, timers } = harness();
    socket.start();
    sockets[0].open();
    socket.stop();
    expect(socket.state).toBe("closed");
    expect(timers).toHaveLength(0);
    expect(sockets).toHaveLength(1);
  });
});

describe("backoffDelay", () => {
  it("jitters within [base/2, base] and caps", () => {
    expect(backoffDelay(0, 100, 1000, () => 0)).toBe(50);
    expect(backoffDelay(3, 100, 1000, () => 1)).toBe(800);
    expect(backoffDelay(50, 100, 1000, () => 1)).toBe(1000);
  });
});
