"""The documentation stands on its own: a reader of the repository can follow every reference in it.

(a) nothing under src/, tests/, docs/ or README.md cites a document outside the repository or an issue tracker;
(b) every relative link in docs/ and README.md resolves, anchors included (docs/security/ is checked by
    tests/test_security_docs.py, whose link checker this reuses), and so does every repository path they name;
(c) every ADR has the common header (title, status, Context / Decision / Consequences), its amendments are
    recorded on both sides, and docs/adr/README.md indexes it with its status;
(d) docs/architecture.md's module map names every package and module under src/edgefleet, and its layers are the
    ones import-linter enforces (pyproject.toml).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from test_security_docs import broken_links

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ADR = DOCS / "adr"
ARCHITECTURE = DOCS / "architecture.md"
PACKAGE = ROOT / "src" / "edgefleet"
TEXT = {".py", ".md", ".html", ".css", ".js", ".yaml", ".yml", ".json", ".ini", ".mako", ".toml", ".txt"}

# ---------------------------------------------------------------------------------------------------- (a)

# Built from parts so that this file does not match its own patterns.
_OUTSIDE = [
    (re.compile(r"\b" + "DES" + r"IGN\b"), "the design notes outside the repository"),
    (re.compile(re.escape("../" + "shared")), "a folder outside the repository"),
    (re.compile(r"\b" + "iss" + r"ues?\s+#?\d+", re.I), "an issue number"),
]


def _citing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("src", "tests", "docs"):
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in TEXT]
    return [p for p in files if "__pycache__" not in p.parts and p != Path(__file__).resolve()]


def test_nothing_cites_what_a_reader_of_the_repository_does_not_have() -> None:
    found = []
    for path in _citing_files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern, what in _OUTSIDE:
                if m := pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)!r} ({what})")
    assert not found, "copy what the reader needs into docs/ instead:\n  " + "\n  ".join(found)


def test_the_citation_check_sees_what_it_looks_for() -> None:
    lines = ["see " + "DES" + "IGN.md §3", "as in " + "../" + "shared/notes", "fixes " + "Iss" + "ue 12", "a design"]
    hits = [any(p.search(line) for p, _ in _OUTSIDE) for line in lines]
    assert hits == [True, True, True, False]


# ---------------------------------------------------------------------------------------------------- (b)


def _linked_docs() -> list[Path]:
    security = DOCS / "security"
    return [ROOT / "README.md", *(p for p in sorted(DOCS.rglob("*.md")) if security not in p.parents)]


def test_every_relative_link_resolves() -> None:
    broken = broken_links(_linked_docs())
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


# A path from the repository's root, as docs write them in prose and code spans: docs/agent.md,
# `tests/test_agent_crash.py`, src/edgefleet/bench/profiles/default.yaml. Globs and placeholders are not paths.
_REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|src|tests|benchmarks|examples|deploy)/[\w./-]*[\w/])")


def test_every_repository_path_named_in_the_docs_exists() -> None:
    missing = []
    for doc in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for m in _REPO_PATH.finditer(line):
                if line[m.end() : m.end() + 1] in ("*", "<", "{"):  # a glob or a placeholder goes on
                    continue
                if not (ROOT / m.group(1)).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{lineno}: {m.group(1)}")
    assert not missing, "paths that do not exist:\n  " + "\n  ".join(missing)


# ---------------------------------------------------------------------------------------------------- (c)

_TITLE = re.compile(r"^# (\d{4}) — \S.*$")
_STATUS = re.compile(r"^Status: (Accepted|Superseded by (\d{4})|Amended by (\d{4}(?:, \d{4})*))$")
_AMENDS = re.compile(r"^(?:Amends|Supersedes): (\d{4}(?:(?:, | and )\d{4})*)\b")
SECTIONS = ("## Context", "## Decision", "## Consequences")


def adrs() -> list[Path]:
    return sorted(ADR.glob("[0-9][0-9][0-9][0-9]-*.md"))


def _header(path: Path) -> tuple[str, set[str], set[str]]:
    """(status, the ADRs this one is amended or superseded by, the ADRs it amends or supersedes)."""
    lines = path.read_text().splitlines()
    body = [line for line in lines[1:] if line.strip()]
    m = _STATUS.match(body[0]) if body else None
    assert m, f"{path.name}: the line after the title must be `Status: Accepted | Superseded by NNNN | Amended by NNNN`"
    later = set(re.findall(r"\d{4}", m.group(1)))
    earlier: set[str] = set()
    if len(body) > 1 and (a := _AMENDS.match(body[1])):
        earlier = set(re.findall(r"\d{4}", a.group(1)))
    return m.group(1), later, earlier


def test_there_are_adrs() -> None:
    assert len(adrs()) >= 20


@pytest.mark.parametrize("path", adrs(), ids=lambda p: p.name[:4])
def test_every_adr_has_the_common_header(path: Path) -> None:
    lines = path.read_text().splitlines()
    m = _TITLE.match(lines[0])
    assert m and m.group(1) == path.name[:4], f"{path.name}: the first line must be `# {path.name[:4]} — Title`"
    _header(path)
    at = [next((i for i, line in enumerate(lines) if line.strip() == s), -1) for s in SECTIONS]
    assert -1 not in at and at == sorted(at), f"{path.name}: needs {', '.join(SECTIONS)}, in that order"


def test_amendments_are_recorded_on_both_sides() -> None:
    numbers = {p.name[:4]: p for p in adrs()}
    wrong = []
    for num, path in numbers.items():
        _, later, earlier = _header(path)
        for n in later | earlier:
            if n not in numbers:
                wrong.append(f"{num} names ADR {n}, which does not exist")
        for n in later & numbers.keys():
            if num not in _header(numbers[n])[2]:
                wrong.append(f"{num} says it is changed by {n}, whose `Amends:` line does not name {num}")
        for n in earlier & numbers.keys():
            if num not in _header(numbers[n])[1]:
                wrong.append(f"{num} amends {n}, whose status does not say `Amended by {num}`")
    assert not wrong, "\n".join(wrong)


def test_the_adr_index_lists_every_adr_with_its_status() -> None:
    index = (ADR / "README.md").read_text()
    wrong = []
    for path in adrs():
        row = next((line for line in index.splitlines() if f"]({path.name})" in line), None)
        status = _header(path)[0]
        if row is None:
            wrong.append(f"{path.name} is not in docs/adr/README.md")
        elif f"| {status}" not in row:
            wrong.append(f"{path.name}: the index does not give its status {status!r}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------- (d)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    nxt = text.find("\n## ", start + 1)
    return text[start : nxt if nxt != -1 else len(text)]


def module_map() -> dict[str, str]:
    """First column → last column (the layer) of the module map table."""
    rows = {}
    for line in _section(ARCHITECTURE.read_text(), "## Module map").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and (m := re.fullmatch(r"`([\w.]+/?)`", cells[0])):
            rows[m.group(1)] = cells[-1]
    return rows


def _packages() -> set[str]:
    subpackages = {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    return subpackages | modules


def test_the_module_map_names_every_package_and_module() -> None:
    mapped = set(module_map())
    assert not _packages() - mapped, f"add to the module map in docs/architecture.md: {sorted(_packages() - mapped)}"
    assert not mapped - _packages(), f"the module map names what is not there: {sorted(mapped - _packages())}"


def documented_layers() -> list[list[str]]:
    block = re.search(r"```\n(.*?)```", _section(ARCHITECTURE.read_text(), "## Layers"), re.S)
    assert block, "docs/architecture.md: the layers are a fenced block under ## Layers"
    layers = []
    for line in block.group(1).splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        names = []
        for cell in cells[1:]:
            if not re.fullmatch(r"[a-z_]+", cell):
                break
            names.append(cell)
        layers.append(names)
    return layers


def enforced_layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    # the package's layers; agent-worker (docs/adr/0106-agent-worker-process-boundary.md) layers inside agent/
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers" and c["containers"] == ["edgefleet"]]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def test_the_documented_layers_are_the_enforced_ones() -> None:
    assert documented_layers() == enforced_layers()
    rank = {name: str(i) for i, layer in enumerate(enforced_layers(), 1) for name in layer}
    wrong = {
        name: (layer, rank.get(name.rstrip("/").removesuffix(".py")))
        for name, layer in module_map().items()
        if layer.isdigit() and layer != rank.get(name.rstrip("/").removesuffix(".py"))
    }
    assert not wrong, f"module map layer vs the contract's: {wrong}"
