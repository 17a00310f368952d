// Resume bookkeeping for terminal output (docs/protocol.md section 2): every `output`
// frame carries `offset`, the byte offset of its first byte in the session's stream. The
// tracker remembers where the page's copy ends, so a reconnect asks for exactly the
// missing bytes (`resumeFrom`), and trims any overlap so nothing is shown twice.

const encoder = new TextEncoder();

export interface Accepted {
  /** The text to write to the terminal ("" when the frame was entirely seen already). */
  text: string;
  /** Bytes between what the page had and this frame's start that it will never get. */
  gap: number;
}

/** UTF-8 byte length of a string, without allocating for pure ASCII. */
export function utf8Length(text: string): number {
  let ascii = true;
  for (let i = 0; i < text.length; i++) {
    if (text.charCodeAt(i) > 0x7f) {
      ascii = false;
      break;
    }
  }
  return ascii ? text.length : encoder.encode(text).length;
}

/** The part of `text` after its first `skip` UTF-8 bytes (never splits a character:
 * the server sends frames that start and end on character boundaries). */
export function dropUtf8Prefix(text: string, skip: number): string {
  if (skip <= 0) return text;
  let bytes = 0;
  let i = 0;
  while (i < text.length && bytes < skip) {
    const code = text.codePointAt(i)!;
    bytes += code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
    i += code > 0xffff ? 2 : 1;
  }
  return text.slice(i);
}

export class ResumeTracker {
  /** Byte offset just past the last output the page has shown; null before any. */
  end: number | null = null;
  /** Bytes known lost (the ring had moved on), summed over the session's life. */
  lost = 0;

  /** Fold in an output frame; returns what to display. */
  accept(offset: number, data: string): Accepted {
    const length = utf8Length(data);
    if (this.end === null) {
      this.end = offset + length;
      return { text: data, gap: 0 };
    }
    const frameEnd = offset + length;
    if (frameEnd <= this.end) return { text: "", gap: 0 }; // a duplicate
    if (offset < this.end) {
      const text = dropUtf8Prefix(data, this.end - offset);
      this.end = frameEnd;
      return { text, gap: 0 };
    }
    const gap = offset - this.end;
    this.lost += gap;
    this.end = frameEnd;
    return { text: data, gap };
  }

  /** The `resumeFrom` to send when re-attaching (undefined: replay the whole ring). */
  resumeFrom(): number | undefined {
    return this.end === null ? undefined : this.end;
  }
}
