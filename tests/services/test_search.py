"""The search service: both engines (real ripgrep, and Python) give the same replies.

One tree holds every case that could split them: multi-byte characters before a match,
long lines, binary files (a NUL at the start, and one past ripgrep's first 64 KiB
buffer), CRLF, bytes that are not UTF-8, `.gitignore` rules (negation, anchored,
directory-only, `**`, nested files), the watcher's ignored directories, the daemon's
temp files, symlinks out of the root and inside it, and a file name that is not UTF-8.
Every query runs through both engines and the replies must be equal; the specific
facts each reply must hold are asserted too, so two equally wrong answers fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.executors import BoundedExecutor
from aetherd.services.jail import Jail
from aetherd.services.search import (
    FindQuery,
    SearchLimits,
    SearchQuery,
    SearchService,
    compile_query,
    smart_case,
)

pytestmark = pytest.mark.skipif(shutil.which("rg") is None, reason="ripgrep is not installed")

UNICODE_LINE = "héllo wörld — ünd 日本語 😀 needle and needle"
LONG_LINE = "x" * 600 + "needle" + "y" * 10
LONGER_LINE = "x" * 600 + "needle" + "y" * 1000
LONG_START = "needle" + "z" * 700


def build_tree(root: Path, outside: Path) -> None:
    def put(rel: str, data: str | bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)

    put(".gitignore", "*.log\n!keep.log\n/anchored.txt\nbuild-out/\ndocs/**/*.tmp\n# a comment\n")
    put("keep.log", "needle kept by negation\n")
    put("drop.log", "needle dropped\n")
    put("anchored.txt", "needle anchored at the root\n")
    put("src/anchored.txt", "needle not anchored here\n")
    put("build-out/x.txt", "needle in an ignored directory\n")
    put("docs/a/b.tmp", "needle tmp\n")
    put("docs/a/b.md", "needle md\n")
    put("src/unicode.txt", "first line\n" + UNICODE_LINE + "\n")
    put("src/long.txt", LONG_LINE + "\n" + LONG_START + "\n" + LONGER_LINE + "\n")
    put("src/bin.dat", b"needle\n\x00binary\n")
    put("src/late_nul.txt", b"needle line\n" * 20000 + b"\x00tail needle\n")
    put("src/crlf.txt", b"needle one\r\nsecond needle\r\n")
    put("src/latin1.txt", b"caf\xe9 \xe9t\xe9 needle\n")
    put("src/meta.txt", "a.b*c (needle) [x]\naXbbc needle\n")
    put("src/case.txt", "NEEDLE upper\nNeedle title\nneedle lower\n")
    put(
        "src/context.txt",
        "".join(f"line {i}{' needle' if i in (5, 6, 9) else ''}\n" for i in range(1, 13)),
    )
    put("src/noeol.txt", "ends without newline needle")
    put("src/empty.txt", "")
    put("sub/.gitignore", "*.gen\n!important.gen\n")
    put("sub/a.gen", "needle gen\n")
    put("sub/important.gen", "needle important\n")
    put("sub/deep/b.gen", "needle deep gen\n")
    put("sub/deep/c.txt", "needle deep txt\n")
    put("sub/x.log", "needle log under sub\n")
    put("sub/deep/.gitignore", "!b.gen\n")
    put("node_modules/pkg/index.js", "needle module\n")
    put("src/node_modules/inner.js", "needle nested module\n")
    put(".git/config", "needle git\n")
    put("__pycache__/x.pyc", "needle pyc\n")
    put(".hidden/h.txt", "needle hidden\n")
    put(".~aetherd-0123456789abcdef.new", "needle temp\n")
    (root / b"caf\xe9.txt".decode("utf-8", "surrogateescape")).write_bytes(b"needle latin name\n")
    outside.mkdir()
    (outside / "secret.txt").write_text("needle outside\n")
    os.symlink(outside, root / "link_out")
    os.symlink(outside / "secret.txt", root / "secret_link.txt")
    os.symlink(root / "src", root / "link_in")
    os.mkfifo(root / "pipe")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    build_tree(root, tmp_path / "outside")
    return root


@pytest.fixture
def service(tree: Path) -> SearchService:
    return SearchService(Jail(tree), BoundedExecutor("search", 2))


async def both(service: SearchService, query: SearchQuery) -> dict[str, Any]:
    """The reply of both engines, which must be equal (but for `engine`)."""
    rg = await service.search(query, "ripgrep")
    py = await service.search(query, "python")
    assert rg.pop("engine") == "ripgrep" and py.pop("engine") == "python"
    assert rg == py
    return rg


async def find_both(service: SearchService, query: FindQuery) -> dict[str, Any]:
    rg = await service.find(query, "ripgrep")
    py = await service.find(query, "python")
    assert rg == py
    return rg


def paths(reply: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for match in reply["matches"]:
        if match["path"] not in out:
            out.append(match["path"])
    return out


def shown(match: dict[str, Any]) -> list[str]:
    return [match["text"][r["start"] : r["end"]] for r in match["ranges"]]


async def test_the_rules_of_the_walk(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle"))
    found = paths(reply)
    assert found == sorted(
        found, key=lambda p: [c.encode("utf-8", "surrogateescape") for c in p.split("/")]
    )
    expected = {
        "/.hidden/h.txt",
        "/caf\ufffd.txt",
        "/docs/a/b.md",
        "/keep.log",
        "/src/anchored.txt",
        "/src/case.txt",
        "/src/context.txt",
        "/src/crlf.txt",
        "/src/latin1.txt",
        "/src/long.txt",
        "/src/meta.txt",
        "/src/noeol.txt",
        "/src/unicode.txt",
        "/sub/deep/b.gen",
        "/sub/deep/c.txt",
        "/sub/important.gen",
    }
    assert set(found) == expected
    # What each rule left out: negation, anchoring, a directory rule, `**`, nested files,
    # ignored directories at any depth, binary files (early and late NUL), temp files,
    # symlinks (out of the root and in), a FIFO.
    for absent in (
        "/drop.log", "/anchored.txt", "/build-out/x.txt", "/docs/a/b.tmp", "/sub/a.gen",
        "/sub/x.log", "/node_modules/pkg/index.js", "/src/node_modules/inner.js",
        "/.git/config", "/__pycache__/x.pyc", "/src/bin.dat", "/src/late_nul.txt",
        "/.~aetherd-0123456789abcdef.new", "/link_out/secret.txt", "/secret_link.txt",
        "/link_in/case.txt", "/pipe",
    ):  # fmt: skip
        assert absent not in found
    assert reply["truncated"] is False


async def test_files_searched_counts_every_candidate(service: SearchService, tree: Path) -> None:
    reply = await both(service, SearchQuery("no such text anywhere"))
    assert reply["matches"] == [] and reply["truncated"] is False
    listed = await find_both(service, FindQuery("*"))
    assert reply["filesSearched"] == len(listed["paths"])
    assert "/src/bin.dat" in listed["paths"] and "/src/empty.txt" in listed["paths"]
    assert "/sub/.gitignore" in listed["paths"]


async def test_character_offsets_after_multibyte_text(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle", include=["unicode.txt"]))
    [match] = reply["matches"]
    assert match["line"] == 2 and match["text"] == UNICODE_LINE
    assert shown(match) == ["needle", "needle"]
    assert match["column"] == UNICODE_LINE.index("needle") + 1
    assert match["ranges"][0]["start"] == UNICODE_LINE.index("needle")  # code points, not bytes


async def test_long_lines_are_cut_around_the_match(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle", include=["long.txt"]))
    first, second, third = reply["matches"]
    # 500 characters that end at the line's end (616), since 50 before the match would overrun
    assert len(first["text"]) == 500 and first["textOffset"] == 116
    assert first["column"] == 601 and shown(first) == ["needle"]
    assert first["text"] == LONG_LINE[116:]
    assert second["textOffset"] == 0 and second["text"] == LONG_START[:500]
    assert shown(second) == ["needle"]
    assert third["textOffset"] == 550 and third["text"] == LONGER_LINE[550:1050]
    assert third["ranges"] == [{"start": 50, "end": 56}]


async def test_crlf_latin1_and_no_final_newline(service: SearchService) -> None:
    reply = await both(
        service, SearchQuery("needle", include=["crlf.txt", "latin1.txt", "noeol.txt"])
    )
    by_path = {(m["path"], m["line"]): m for m in reply["matches"]}
    assert by_path[("/src/crlf.txt", 1)]["text"] == "needle one"
    assert by_path[("/src/crlf.txt", 2)]["text"] == "second needle"
    latin = by_path[("/src/latin1.txt", 1)]
    assert latin["text"] == "caf\ufffd \ufffdt\ufffd needle" and shown(latin) == ["needle"]
    assert by_path[("/src/noeol.txt", 1)]["text"] == "ends without newline needle"


async def test_non_utf8_names_carry_raw_paths(service: SearchService) -> None:
    reply = await both(service, SearchQuery("latin name"))
    [match] = reply["matches"]
    assert match["path"] == "/caf\ufffd.txt"
    import base64

    assert base64.b64decode(match["rawPath"]) == b"/caf\xe9.txt"
    found = await find_both(service, FindQuery("caf"))
    assert "/caf\ufffd.txt" in found["paths"]
    raw = found["rawPaths"][found["paths"].index("/caf\ufffd.txt")]
    assert base64.b64decode(raw) == b"/caf\xe9.txt"


async def test_include_narrows_and_never_unignores(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle", include=["*.gen"]))
    assert paths(reply) == ["/sub/deep/b.gen", "/sub/important.gen"]  # /sub/a.gen stays ignored
    reply = await both(service, SearchQuery("needle", include=["/sub/"]))
    assert paths(reply) == ["/sub/deep/b.gen", "/sub/deep/c.txt", "/sub/important.gen"]
    reply = await both(service, SearchQuery("needle", include=["src/**"], exclude=["*.txt"]))
    assert paths(reply) == []
    reply = await both(service, SearchQuery("needle", exclude=["src", "deep/"]))
    assert all(not p.startswith(("/src/", "/sub/deep/")) for p in paths(reply))
    assert "/sub/important.gen" in paths(reply)
    reply = await both(service, SearchQuery("needle", include=["{keep,drop}.log", "src/*.t?t"]))
    assert "/keep.log" in paths(reply) and "/src/case.txt" in paths(reply)
    assert "/drop.log" not in paths(reply)


async def test_a_subdirectory_obeys_the_rules_above_it(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle", path="/sub"))
    # /sub/x.log is ignored by the root's `*.log`, although only /sub is walked.
    assert paths(reply) == ["/sub/deep/b.gen", "/sub/deep/c.txt", "/sub/important.gen"]
    reply = await both(service, SearchQuery("needle", path="/build-out"))
    assert paths(reply) == ["/build-out/x.txt"]  # named explicitly: searched


async def test_literal_and_regex(service: SearchService) -> None:
    reply = await both(service, SearchQuery("(needle) [x]", include=["meta.txt"]))
    assert [m["line"] for m in reply["matches"]] == [1]
    assert shown(reply["matches"][0]) == ["(needle) [x]"]
    reply = await both(service, SearchQuery("a.b*c", include=["meta.txt"]))
    assert [m["line"] for m in reply["matches"]] == [1]  # literal: the dot is a dot
    reply = await both(service, SearchQuery(r"a.b+c\s", regex=True, include=["meta.txt"]))
    assert [m["line"] for m in reply["matches"]] == [2]
    reply = await both(service, SearchQuery(r"line \d{1,2} ne+dle$", regex=True))
    assert [(m["path"], m["line"]) for m in reply["matches"]] == [
        ("/src/context.txt", 5), ("/src/context.txt", 6), ("/src/context.txt", 9)
    ]  # fmt: skip
    reply = await both(service, SearchQuery(r"(?i)^NEEDLE\b", regex=True, include=["case.txt"]))
    assert [m["line"] for m in reply["matches"]] == [1, 2, 3]
    reply = await both(service, SearchQuery(r"[^\x00-\x7f]+", regex=True, include=["unicode.txt"]))
    assert shown(reply["matches"][0])[0] == "é"


async def test_smart_case(service: SearchService) -> None:
    lower = await both(service, SearchQuery("needle", include=["case.txt"]))
    assert [m["line"] for m in lower["matches"]] == [1, 2, 3]
    upper = await both(service, SearchQuery("NEEDLE", include=["case.txt"]))
    assert [m["line"] for m in upper["matches"]] == [1]
    forced = await both(service, SearchQuery("needle", include=["case.txt"], case_sensitive=True))
    assert [m["line"] for m in forced["matches"]] == [3]
    loose = await both(service, SearchQuery("Needle", include=["case.txt"], case_sensitive=False))
    assert [m["line"] for m in loose["matches"]] == [1, 2, 3]
    assert smart_case(r"\S+\W", regex=True) is False and smart_case(r"\Sa", regex=True) is False
    assert smart_case(r"\x4Fa", regex=True) is False and smart_case("aB", regex=True) is True


async def test_max_results_truncates_in_order(service: SearchService) -> None:
    full = await both(service, SearchQuery("needle"))
    assert len(full["matches"]) > 5
    for limit in (1, 3, 5, len(full["matches"])):
        cut = await both(service, SearchQuery("needle", max_results=limit))
        assert cut["matches"] == full["matches"][:limit]
        assert cut["truncated"] is (limit < len(full["matches"]))
        assert cut["filesSearched"] == full["filesSearched"]


async def test_many_matches_in_many_files_keep_the_first_in_order(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for d in range(7):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (root / f"d{d}" / f"f{f:02}.txt").write_text("hit\n" * 9)
    service = SearchService(Jail(root), BoundedExecutor("search", 2))
    reply = await both(service, SearchQuery("hit", max_results=100))
    assert len(reply["matches"]) == 100 and reply["truncated"] is True
    assert reply["matches"][0]["path"] == "/d0/f00.txt"
    assert reply["matches"][-1] == {**reply["matches"][-1], "path": "/d0/f11.txt", "line": 1}
    assert reply["filesSearched"] == 210


async def test_context_lines(service: SearchService) -> None:
    reply = await both(service, SearchQuery("needle", include=["context.txt"], context_lines=2))
    five, six, nine = reply["matches"]
    assert five["before"] == ["line 3", "line 4"] and five["after"] == ["line 6 needle", "line 7"]
    assert six["before"] == ["line 4", "line 5 needle"] and six["after"] == ["line 7", "line 8"]
    assert nine["before"] == ["line 7", "line 8"] and nine["after"] == ["line 10", "line 11"]
    reply = await both(service, SearchQuery("line 1 ", include=["context.txt"], context_lines=3))
    assert reply["matches"] == []
    reply = await both(service, SearchQuery("line 12", include=["context.txt"], context_lines=3))
    [last] = reply["matches"]
    assert last["before"] == ["line 9 needle", "line 10", "line 11"] and last["after"] == []
    plain = await both(service, SearchQuery("needle", include=["context.txt"]))
    assert "before" not in plain["matches"][0]


async def test_find(service: SearchService) -> None:
    found = await find_both(service, FindQuery("*.gen"))
    assert found == {"paths": ["/sub/deep/b.gen", "/sub/important.gen"], "truncated": False}
    found = await find_both(service, FindQuery("ANCH"))
    assert found["paths"] == []  # smart case: an upper-case pattern is case-sensitive
    found = await find_both(service, FindQuery("anch"))
    assert found["paths"] == ["/src/anchored.txt"]
    found = await find_both(service, FindQuery("src/**/*.txt", max_results=3))
    assert found["paths"] == ["/src/anchored.txt", "/src/case.txt", "/src/context.txt"]
    assert found["truncated"] is True
    found = await find_both(service, FindQuery("*.txt", path="/sub"))
    assert found["paths"] == ["/sub/deep/c.txt"]


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?=needle)x", r"(?<!a)b", r"(a)\1", r"\0", r"\Aneedle", r"needle\Z", r"(?x) a",
        r"(?a)\w", r"(?#c)a", r"[[:alpha:]]", r"a{,3}", r"x*", r"a|", r"\bx*", "(?P<n>a)(?P=n)",
        r"\p{L}", "a\nb", r"(?<n>a)", r"[a--b]", "(a",
    ],
)  # fmt: skip
def test_regexes_outside_the_common_subset_are_refused(pattern: str) -> None:
    with pytest.raises(AetherError) as caught:
        compile_query(pattern, True, None)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert caught.value.extra == {"field": "query"}


@pytest.mark.parametrize(
    "pattern",
    [
        r"a.b",
        r"[a-z]+\d",
        r"(?i)x",
        r"(?:a|b)c",
        r"(?P<n>a)",
        r"\bword\b",
        r"^a$",
        r"a{2,3}?",
        r"\x41\u00e9",
    ],
)
def test_regexes_in_the_common_subset_are_accepted(pattern: str) -> None:
    compile_query(pattern, True, None)


async def test_bad_globs_and_paths(service: SearchService, tree: Path) -> None:
    with pytest.raises(AetherError) as caught:
        await service.search(SearchQuery("x", include=["[a-"]))
    assert caught.value.code is ErrorCode.INVALID_MESSAGE and caught.value.extra == {
        "field": "include"
    }
    with pytest.raises(AetherError) as caught:
        await service.search(SearchQuery("x", path="/../etc"))
    assert caught.value.code is ErrorCode.INVALID_PATH
    with pytest.raises(AetherError) as caught:
        await service.search(SearchQuery("x", path="/link_out"))
    assert caught.value.code is ErrorCode.INVALID_PATH
    with pytest.raises(AetherError) as caught:
        await service.find(FindQuery("x", path="/keep.log"))
    assert caught.value.code is ErrorCode.NOT_DIRECTORY
    with pytest.raises(AetherError) as caught:
        await service.find(FindQuery("x", path="/nope"))
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_the_reply_size_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "wide"
    root.mkdir()
    (root / "a.txt").write_text(("needle " + "w" * 490 + "\n") * 50)
    service = SearchService(
        Jail(root), BoundedExecutor("search", 1), SearchLimits(max_reply_chars=5000)
    )
    reply = await both(service, SearchQuery("needle"))
    assert reply["truncated"] is True
    assert len(reply["matches"]) == 10  # 10 lines of 497 characters fit in 5000, 11 do not


@pytest.mark.parametrize("engine", ["ripgrep", "python"])
async def test_the_time_limit(tmp_path: Path, engine: str) -> None:
    root = tmp_path / "slow"
    root.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa ".split()
    lines = [" ".join(words[(i * 7 + j) % 10] for j in range(12)) for i in range(20000)]
    for n in range(40):
        (root / f"f{n:02}.txt").write_text("\n".join(lines) + "\n")
    service = SearchService(Jail(root), BoundedExecutor("search", 1), SearchLimits(timeout=0.001))
    slow = SearchQuery(r"\b\w+\b.{0,100}\b\w{7}\b.{0,50}ta$", regex=True)
    with pytest.raises(AetherError) as caught:
        await service.search(slow, engine)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.LIMIT_EXCEEDED
    assert service.timeouts == 1
    await asyncio.sleep(0)


def test_an_explicit_ripgrep_engine_needs_ripgrep(tmp_path: Path) -> None:
    from aetherd.errors import SettingsError

    with pytest.raises(SettingsError):
        SearchService(
            Jail(tmp_path), BoundedExecutor("s", 1), engine="ripgrep", rg_binary="no-such-rg"
        )
    fallback = SearchService(Jail(tmp_path), BoundedExecutor("s", 1), rg_binary="no-such-rg")
    assert fallback.engine == "python"
    assert (
        SearchService(Jail(tmp_path), BoundedExecutor("s", 1), engine="python").engine == "python"
    )


async def test_cancelling_stops_the_python_engine(tmp_path: Path) -> None:
    """The walk and the reads run in a thread; a cancelled search stops it at the next file."""
    from tests.support import wait_for

    root = tmp_path / "many"
    root.mkdir()
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa\n" * 2000
    for n in range(400):
        (root / f"f{n:03}.txt").write_text(text)
    executor = BoundedExecutor("search", 1)
    service = SearchService(Jail(root), executor, engine="python")
    slow = SearchQuery(r"\b\w+\b.{0,100}\b\w{7}\b.{0,50}ta$", regex=True)
    task = asyncio.ensure_future(service.search(slow))
    await wait_for(lambda: executor.busy == 1, timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: executor.busy == 0, timeout=10)
    assert service.cancelled == 1


def test_the_json_stream_reads_the_same_in_any_chunks(tree: Path) -> None:
    """ripgrep's output split anywhere (mid-line, mid-message) gives the same result."""
    import subprocess

    from aetherd.services.search import RgJson, TopN

    out = subprocess.run(
        ["rg", "--json", "--no-config", "--hidden", "--context", "1", "-e", "needle"],
        cwd=tree,
        capture_output=True,
        check=False,
    ).stdout
    assert out.count(b'{"type":"begin"') > 10

    def read(size: int, limit: int) -> tuple[Any, bool]:
        top = TopN(limit, 10**9)
        stream = RgJson(top, 1)
        for start in range(0, len(out), size):
            stream.feed(out[start : start + size])
        assert stream.pending == b""
        return top.result(), stream.summary

    for limit in (1, 3, 1000):
        whole = read(len(out), limit)
        assert whole[1] is True
        assert len(whole[0][0]) == min(limit, len(whole[0][0])) and whole[0][0]
        for size in (5, 13, 64, 4096):  # 5 and 13 split every marker
            assert read(size, limit) == whole
