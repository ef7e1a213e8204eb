"""The security documents stay true to the code they describe.

(a) every `edgefleet …` command line in a fenced ``sh`` block of docs/security/ parses against the real CLI: the
    command path must exist and its options and arguments must parse (click's own parser, via ``make_context``),
    so a renamed option or a removed command fails here instead of in an incident;
(b) every test that docs/security/attacks.md names exists, and a "TO FILL" row is only allowed while its test file
    does not exist yet;
(c) every relative link in docs/security/ resolves, anchors included.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer

# typer carries its own copy of click (typer._click) and builds the CLI's commands on it: the parser's errors are
# that copy's classes, not the standalone click's
from typer._click.exceptions import BadParameter, MissingParameter
from typer._click.exceptions import UsageError as ClickUsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "security"
FENCE = re.compile(r"^```[ \t]*(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELLS = {"sh", "bash", "shell"}
PLACEHOLDER = "PLACEHOLDER"
# words a reader replaces: ID, DEVICE_ID, $DEVICE, ${GROUP}, and what <…> and $(…) stood for
_PLACEHOLDER_WORD = re.compile(r"^(?:[A-Z][A-Z0-9_]*|\$\{?\w+\}?)$")
_PREFIXES = {"sudo", "env", "exec", "time", "nohup", "command"}


def security_docs() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


# ---------------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/security/runbooks.md:42"
    words: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.words)


def _logical_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """Lines of a shell block with backslash continuations joined, each with the line number it starts on."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = first_line
    for i, line in enumerate(block.splitlines()):
        if not buf:
            start = first_line + i
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        out.append((start, " ".join(buf)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def _substitutions(line: str) -> tuple[str, list[str]]:
    """Replace ``$(…)`` and backquoted substitutions with a placeholder; return the inner commands too (they may
    be edgefleet commands themselves)."""
    inner: list[str] = []

    def take(m: re.Match[str]) -> str:
        inner.append(m.group(1))
        return PLACEHOLDER

    line = re.sub(r"\$\(([^()]*)\)", take, line)
    line = re.sub(r"`([^`]*)`", take, line)
    return line, inner


def _segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split on pipes, lists and subshells, redirections dropped."""
    line = re.sub(r"<[^<>\n]+>", PLACEHOLDER, line)  # <TOKEN>, <rollout id>
    line = re.sub(r"(?<=\s)\d*>{1,2}(?:&\d+|\s*[^\s|;&]+)", " ", line)  # > out.json, 2>&1, >> log
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    segments: list[list[str]] = [[]]
    for tok in lex:
        if tok and set(tok) <= set("();<>|&"):
            segments.append([])
        else:
            segments[-1].append(tok)
    return [s for s in segments if s]


def _edgefleet_words(words: list[str]) -> list[str] | None:
    """The words of an edgefleet invocation (``edgefleet`` first), past env assignments and sudo/env/time."""
    i = 0
    while i < len(words):
        w = words[i]
        if re.match(r"^[A-Za-z_]\w*=", w):
            i += 1
        elif w in _PREFIXES:
            i += 1
            while i < len(words) and words[i].startswith("-"):  # sudo -u USER -E …
                i += 2 if words[i] in ("-u", "-g") else 1
        else:
            break
    if i < len(words) and Path(words[i]).name == "edgefleet":
        return ["edgefleet", *words[i + 1 :]]
    return None


def commands_in(text: str, name: str) -> list[DocCommand]:
    found: list[DocCommand] = []
    for block in FENCE.finditer(text):
        if block.group(1).lower() not in SHELLS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        for lineno, line in _logical_lines(block.group(2), first):
            pending = [line]
            while pending:
                outer, inner = _substitutions(pending.pop())
                pending.extend(inner)
                for seg in _segments(outer):
                    words = _edgefleet_words(seg)
                    if words is not None:
                        found.append(DocCommand(f"{name}:{lineno}", tuple(words)))
    return found


def all_commands() -> list[DocCommand]:
    return [c for p in security_docs() for c in commands_in(p.read_text(), str(p.relative_to(ROOT)))]


# ---------------------------------------------------------------------------------------------------- parsing


@cache
def _root_command() -> Any:
    from edgefleet.cli.main import app

    return typer.main.get_command(app)


def _is_placeholder(word: str) -> bool:
    return word == PLACEHOLDER or bool(_PLACEHOLDER_WORD.match(word))


def _make_context(cmd: Any, name: str, args: list[str]) -> str | None:
    try:
        cmd.make_context(name, list(args))
    except BadParameter as err:
        if isinstance(err, MissingParameter):
            return f"`{name}`: {err.format_message()}"
        # a file the reader has and this checkout does not is no mistake of the document
        if type(getattr(err.param, "type", None)).__name__ in {"Path", "File"}:
            return None
        return f"`{name}`: {err.format_message()}"
    except ClickUsageError as err:  # unknown option, extra argument, missing value
        return f"`{name}`: {err.format_message()}"
    return None


def parse_error(words: list[str] | tuple[str, ...]) -> str | None:
    """None when ``words`` (``edgefleet`` first) parse against the real CLI, else why not."""
    cmd = _root_command()
    path = ["edgefleet"]
    rest = list(words[1:])
    while hasattr(cmd, "commands"):
        if not rest or rest[0].startswith("-"):
            return f"`{' '.join(path)}` needs a command: one of {', '.join(sorted(cmd.commands))}"
        sub = cmd.commands.get(rest[0])
        if sub is None:
            known = ", ".join(sorted(cmd.commands))
            return f"no command `{' '.join([*path, rest[0]])}`: `{' '.join(path)}` has {known}"
        cmd = sub
        path.append(rest.pop(0))
    if "--help" in rest or "-h" in rest:
        return None
    name = " ".join(path)
    err = _make_context(cmd, name, rest)
    if err is not None and any(_is_placeholder(a) for a in rest):
        # ID, $DEVICE, <TOKEN> stand for values of the parameter's type: a number where it takes one
        err = _make_context(cmd, name, ["1" if _is_placeholder(a) else a for a in rest]) and err
    return err


# ---------------------------------------------------------------------------------------------------- (a)


def test_the_documents_exist_and_hold_commands() -> None:
    names = {p.name for p in security_docs()}
    assert {"README.md", "threat-model.md", "runbooks.md", "attacks.md"} <= names, sorted(names)
    cmds = all_commands()
    # guards the extractor: a broken fence or split would otherwise make test (a) pass on nothing
    assert len(cmds) >= 30, [str(c) for c in cmds]
    assert any(c.words[:3] == ("edgefleet", "rollout", "pause") for c in cmds)


@pytest.mark.parametrize("cmd", all_commands(), ids=lambda c: f"{c.where}")
def test_every_documented_command_parses_against_the_cli(cmd: DocCommand) -> None:
    err = parse_error(cmd.words)
    assert err is None, f"{cmd.where}: {cmd}\n  {err}"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("edgefleet devices frobnicate ID", "no command `edgefleet devices frobnicate`"),
        ("edgefleet frobnicate", "no command `edgefleet frobnicate`"),
        ("edgefleet rollout pause ID --no-such-option", "No such option"),
        ("edgefleet rollout pause ID EXTRA", "unexpected extra argument"),
        ("edgefleet rollout pause", "Missing argument"),
        ("edgefleet devices token --expires 1h", "Missing option"),
        ("edgefleet rollout", "needs a command"),
    ],
)
def test_the_checker_refuses_unknown_commands_options_and_arguments(line: str, why: str) -> None:
    (cmd,) = commands_in(f"```sh\n{line}\n```\n", "t.md")
    err = parse_error(cmd.words)
    assert err is not None and why in err, err


def test_the_extractor_reads_shell_as_a_reader_types_it() -> None:
    text = """
```sh
# a comment
EDGEFLEET_API_TOKEN=$(cat admin-token) edgefleet rollout pause <ROLLOUT_ID> \\
    --reason "bad canary"   # why
edgefleet devices list --json | jq '.[] | .id' > ids.txt 2>&1
export T=$(edgefleet devices token --tier x86-avx2 --json)
sudo -u edgefleet edgefleet fleet status && echo done
```

```python
edgefleet not a shell block
```
"""
    got = [(c.where, list(c.words)) for c in commands_in(text, "t.md")]
    assert got == [
        ("t.md:4", ["edgefleet", "rollout", "pause", PLACEHOLDER, "--reason", "bad canary"]),
        ("t.md:6", ["edgefleet", "devices", "list", "--json"]),
        ("t.md:7", ["edgefleet", "devices", "token", "--tier", "x86-avx2", "--json"]),
        ("t.md:8", ["edgefleet", "fleet", "status"]),
    ]
    assert all(parse_error(words) is None for _, words in got)


# ---------------------------------------------------------------------------------------------------- (b)

_TEST_REF = re.compile(r"(tests/[\w/.-]+\.py)::([A-Za-z_]\w*)")
_TO_FILL = re.compile(r"TO FILL[^|`]*`?(tests/[\w/.-]+\.py)")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def test_every_test_named_in_attacks_md_exists() -> None:
    text = (DOCS / "attacks.md").read_text()
    refs = _TEST_REF.findall(text)
    assert len(refs) >= 30, "attacks.md names too few tests: is the table intact?"
    missing = []
    for file, name in refs:
        p = ROOT / file
        if not p.is_file():
            missing.append(f"{file} (no such file)")
        elif name not in _test_names(p):
            missing.append(f"{file}::{name}")
    assert not missing, "attacks.md names tests that do not exist:\n  " + "\n  ".join(sorted(set(missing)))


def test_to_fill_rows_only_for_test_files_not_written_yet() -> None:
    text = (DOCS / "attacks.md").read_text()
    landed = sorted({f for f in _TO_FILL.findall(text) if (ROOT / f).is_file()})
    assert not landed, (
        "these test files exist now: replace their TO FILL rows in docs/security/attacks.md with the tests "
        f"(tests/<file>.py::test_name) and the attack each one tries: {landed}"
    )


# ---------------------------------------------------------------------------------------------------- (c)

_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(docs: Iterable[Path]) -> list[str]:
    """Each relative link of ``docs`` whose file or heading does not exist (fenced blocks and links written as code
    are examples, not links)."""
    broken = []
    for doc in docs:
        text = FENCE.sub("", doc.read_text())
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where} no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} no heading #{anchor} in {dest.relative_to(ROOT)}")
    return broken


def test_every_relative_link_resolves() -> None:
    broken = broken_links(security_docs())
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_slug_matches_githubs() -> None:
    assert _slug("A compromised device") == "a-compromised-device"
    assert _slug("4. Lost database (PostgreSQL, SQLite)") == "4-lost-database-postgresql-sqlite"
    assert _slug("`edgefleet agent` will not start") == "edgefleet-agent-will-not-start"
