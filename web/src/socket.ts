// The console's one WebSocket: authenticates with the subprotocol form, reconnects with
// bounded exponential backoff, matches replies to requests by requestId, and routes
// pushed frames to per-channel listeners. No DOM here, so Vitest drives it with a fake.

export type SocketState = "connecting" | "open" | "reconnecting" | "closed";

/** The subset of the browser WebSocket this module uses (a fake in the unit tests). */
export interface WebSocketLike {
  readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketFactory = (url: string, protocols: string[]) => WebSocketLike;

export interface Frame {
  channel: string;
  type: string;
  requestId?: string;
  [field: string]: unknown;
}

export class RequestError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly frame: Frame | null,
  ) {
    super(message);
  }
}

export interface SocketOptions {
  url: string;
  token: string;
  factory?: WebSocketFactory;
  /** First retry delay in ms; doubles per failed attempt up to maxDelay. */
  minDelay?: number;
  maxDelay?: number;
  /** Frames queued while disconnected (terminal input typed meanwhile); older ones drop. */
  maxQueued?: number;
  /** Pending requests at once; more are refused at once. */
  maxPending?: number;
  requestTimeout?: number;
  /** Random source for the backoff jitter (tests pass a constant). */
  random?: () => number;
  setTimer?: (fn: () => void, ms: number) => unknown;
  clearTimer?: (handle: unknown) => void;
}

const OPEN = 1;
type Listener = (frame: Frame) => void;

interface Pending {
  resolve: (frame: Frame) => void;
  reject: (err: Error) => void;
  timer: unknown;
}

/** The delay before reconnect attempt `attempt` (0-based): exponential, capped, jittered. */
export function backoffDelay(attempt: number, min: number, max: number, random: () => number): number {
  const base = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(base / 2 + (base / 2) * random());
}

export class ReconnectingSocket {
  state: SocketState = "closed";
  private ws: WebSocketLike | null = null;
  private attempt = 0;
  private retryTimer: unknown = null;
  private stopped = true;
  private queue: string[] = [];
  private pending = new Map<string, Pending>();
  private listeners = new Map<string, Set<Listener>>();
  private stateListeners = new Set<(state: SocketState, detail: string) => void>();
  private nextId = 0;
  private readonly o: Required<SocketOptions>;
  /** Connections opened so far (1 after the first, 2 after one reconnect, ...). */
  connections = 0;

  constructor(options: SocketOptions) {
    this.o = {
      factory: (url, protocols) => new WebSocket(url, protocols) as unknown as WebSocketLike,
      minDelay: 250,
      maxDelay: 5000,
      maxQueued: 1000,
      maxPending: 256,
      requestTimeout: 30000,
      random: Math.random,
      setTimer: (fn, ms) => setTimeout(fn, ms),
      clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
      ...options,
    };
  }

  /** Listen to pushed frames (and replies) of `channel`; returns the unsubscribe function. */
  on(channel: string, listener: Listener): () => void {
    let set = this.listeners.get(channel);
    if (!set) this.listeners.set(channel, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  onState(listener: (state: SocketState, detail: string) => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.open();
  }

  stop(): void {
    this.stopped = true;
    if (this.retryTimer !== null) this.o.clearTimer(this.retryTimer);
    this.retryTimer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "closed by the page");
    this.failPending("the console closed the connection");
    this.setState("closed", "");
  }

  /** Send a frame now, or queue it (bounded) until the socket is open again. */
  send(frame: Frame): void {
    const text = JSON.stringify(frame);
    if (this.ws && this.ws.readyState === OPEN && this.state === "open") {
      this.ws.send(text);
      return;
    }
    this.queue.push(text);
    if (this.queue.length > this.o.maxQueued) this.queue.splice(0, this.queue.length - this.o.maxQueued);
  }

  /** Send only when open; returns false (and drops it) otherwise. For frames that make no
   * sense after a reconnect (resize, attach), which the page re-sends on reconnect anyway. */
  sendIfOpen(frame: Frame): boolean {
    if (this.ws && this.ws.readyState === OPEN && this.state === "open") {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /** Send a request and wait for its reply; rejects with RequestError on failure. */
  request<T = unknown>(frame: Frame, options: { requestId?: string } = {}): Promise<T> {
    if (this.pending.size >= this.o.maxPending) {
      return Promise.reject(new RequestError("too many requests in flight", "LIMIT_EXCEEDED", null));
    }
    const requestId = options.requestId ?? `c${++this.nextId}`;
    return new Promise<T>((resolve, reject) => {
      const timer = this.o.setTimer(() => {
        this.pending.delete(requestId);
        reject(new RequestError(`no reply to ${frame.channel}/${frame.type}`, "TIMEOUT", null));
      }, this.o.requestTimeout);
      this.pending.set(requestId, {
        resolve: (reply) => resolve(reply.data as T),
        reject,
        timer,
      });
      this.send({ ...frame, requestId });
    });
  }

  private open(): void {
    this.setState(this.connections === 0 ? "connecting" : "reconnecting", "");
    let ws: WebSocketLike;
    try {
      ws = this.o.factory(this.o.url, ["bearer", this.o.token]);
    } catch (err) {
      this.scheduleRetry(String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.attempt = 0;
      this.connections += 1;
      this.setState("open", "");
      const queued = this.queue;
      this.queue = [];
      for (const text of queued) ws.send(text);
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws || typeof ev.data !== "string") return;
      let frame: Frame;
      try {
        frame = JSON.parse(ev.data) as Frame;
      } catch {
        return;
      }
      this.dispatch(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // Requests in flight have no reply coming on a new socket.
      this.failPending(`connection lost (${ev.code})`);
      if (this.stopped) return;
      this.scheduleRetry(ev.reason || `closed with ${ev.code}`);
    };
    ws.onerror = () => undefined;
  }

  private scheduleRetry(detail: string): void {
    const delay = backoffDelay(this.attempt++, this.o.minDelay, this.o.maxDelay, this.o.random);
    this.setState("reconnecting", detail);
    this.retryTimer = this.o.setTimer(() => {
      this.retryTimer = null;
      if (!this.stopped) this.open();
    }, delay);
  }

  private dispatch(frame: Frame): void {
    const id = frame.requestId;
    if (typeof id === "string" && "success" in frame) {
      const waiting = this.pending.get(id);
      if (waiting) {
        this.pending.delete(id);
        this.o.clearTimer(waiting.timer);
        if (frame.success) waiting.resolve(frame);
        else waiting.reject(new RequestError(String(frame.error ?? "failed"), String(frame.code ?? ""), frame));
        return;
      }
    }
    for (const listener of this.listeners.get(frame.channel) ?? []) listener(frame);
    for (const listener of this.listeners.get("*") ?? []) listener(frame);
  }

  private failPending(reason: string): void {
    for (const [id, waiting] of this.pending) {
      this.o.clearTimer(waiting.timer);
      waiting.reject(new RequestError(reason, "DISCONNECTED", null));
      this.pending.delete(id);
    }
  }

  private setState(state: SocketState, detail: string): void {
    this.state = state;
    for (const listener of this.stateListeners) listener(state, detail);
  }

  /** Frames waiting for the socket to open (for tests and the status line). */
  get queued(): number {
    return this.queue.length;
  }
}
