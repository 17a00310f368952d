import { describe, expect, it } from "vitest";
import { ResumeTracker, dropUtf8Prefix, utf8Length } from "../src/resume";

describe("ResumeTracker", () => {
  it("starts from the first frame and asks to resume where the output ended", () => {
    const t = new ResumeTracker();
    expect(t.resumeFrom()).toBeUndefined();
    expect(t.accept(100, "hello")).toEqual({ text: "hello", gap: 0 });
    expect(t.resumeFrom()).toBe(105);
    expect(t.accept(105, " world").text).toBe(" world");
    expect(t.resumeFrom()).toBe(111);
  });

  it("drops a frame it has entirely seen, and trims a partial overlap", () => {
    const t = new ResumeTracker();
    t.accept(0, "abcdef");
    expect(t.accept(0, "abc")).toEqual({ text: "", gap: 0 });
    expect(t.accept(2, "cdefgh")).toEqual({ text: "gh", gap: 0 });
    expect(t.resumeFrom()).toBe(8);
  });

  it("counts bytes, not UTF-16 units, across multi-byte characters", () => {
    const t = new ResumeTracker();
    t.accept(0, "é€😀"); // 2 + 3 + 4 bytes
    expect(t.resumeFrom()).toBe(9);
    expect(t.accept(2, "€😀!").text).toBe("!");
    expect(t.resumeFrom()).toBe(10);
  });

  it("reports a gap when the ring moved on while the page was away", () => {
    const t = new ResumeTracker();
    t.accept(0, "abc");
    expect(t.accept(10, "xyz")).toEqual({ text: "xyz", gap: 7 });
    expect(t.lost).toBe(7);
    expect(t.resumeFrom()).toBe(13);
  });
});

describe("utf8 helpers", () => {
  it("measures and slices by UTF-8 bytes", () => {
    expect(utf8Length("abc")).toBe(3);
    expect(utf8Length("é")).toBe(2);
    expect(utf8Length("😀")).toBe(4);
    expect(dropUtf8Prefix("é😀x", 2)).toBe("😀x");
    expect(dropUtf8Prefix("é😀x", 6)).toBe("x");
    expect(dropUtf8Prefix("abc", 0)).toBe("abc");
  });
});
