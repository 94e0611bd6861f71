"""Every error message the tools can raise, read from the source with `ast` (so docs/troubleshooting.md is
checked against the code, not against a list someone keeps by hand).

A message is the text of: `raise SomeError(msg)`, `sys.exit(msg)`, `print("error: ...")`, and the message
helpers `need(ok, msg)` / `bad(msg)`; a name bound to a string in the same function is followed. Placeholders
of f-strings become `{}`. Shell scripts count too: `echo "error: ..."` (with backslash continuations; `$VAR`
becomes `{}`). Data-preparation rejects (`Reject("code", detail)`) are collected as reason codes.

    python -m tests.docs.error_messages          # list them, marking those docs/troubleshooting.md lacks
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("lora_engine", "indextts_integration", "scripts")
HELPERS = {"need": 1, "bad": 0}  # helper name -> index of its message argument
PLACEHOLDER = "{}"


@dataclasses.dataclass(frozen=True)
class Message:
    file: str
    line: int
    kind: str  # exception class, "sys.exit", "print", a helper name, or "Reject"
    text: str  # literal text with {} for every placeholder

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def stem(self) -> str | None:
        """The longest literal piece (at most 60 characters): what the docs must quote. None if no text."""
        pieces = [_clean(p) for p in self.text.split(PLACEHOLDER)]
        best = max(pieces, key=len, default="")
        return best[:60].strip() if len(best) >= 4 else None


def _clean(piece: str) -> str:
    return re.sub(r"\s+", " ", piece).strip(" .,:;'\"()[]")


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _literal(node: ast.AST, names: dict[str, ast.AST]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, names), _literal(node.right, names)
        return None if left is None and right is None else (left or PLACEHOLDER) + (right or PLACEHOLDER)
    if isinstance(node, ast.Name) and node.id in names:
        return _literal(names[node.id], names)
    return None


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _scan_function(tree: ast.AST, file: str, out: list[Message]) -> None:
    names = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        call, kind, arg = None, None, 0
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            call, kind = node.exc, _call_name(node.exc)
        elif isinstance(node, ast.Call) and _call_name(node) in HELPERS:
            call, kind, arg = node, _call_name(node), HELPERS[_call_name(node)]
        elif isinstance(node, ast.Call) and _call_name(node) == "exit" and isinstance(node.func, ast.Attribute):
            call, kind = node, "sys.exit"
        elif isinstance(node, ast.Call) and _call_name(node) == "print":
            call, kind = node, "print"
        if call is None or len(call.args) <= arg:
            continue
        text = _literal(call.args[arg], names)
        if text is None or (kind == "print" and not text.startswith("error:")):
            continue
        out.append(Message(file, node.lineno, kind, text))


def _shell_messages(path: Path, rel: str, out: list[Message]) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r'\s*echo "error:', line):
            continue
        text, j = line, i
        while text.rstrip().endswith("\\") and j + 1 < len(lines):
            j += 1
            text = text.rstrip()[:-1] + " " + lines[j]
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text.split(">&2")[0])
        joined = " ".join(strings)
        out.append(Message(rel, i + 1, "echo", re.sub(r"\$\{?\w+\}?", PLACEHOLDER, joined)))


def error_messages() -> list[Message]:
    out: list[Message] = []
    for path in sorted((REPO / "scripts").glob("*.sh")):
        _shell_messages(path, str(path.relative_to(REPO)), out)
    for root in SOURCES:
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            rel = str(path.relative_to(REPO))
            for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                _scan_function(fn, rel, out)
    unique = {(m.file, m.line, m.text): m for m in out}  # nested functions are walked twice
    return sorted(unique.values(), key=lambda m: (m.file, m.line))


def quoted_lines(markdown: str) -> list[str]:
    """Lines of the ```text blocks of the troubleshooting page, where messages are quoted (… for values)."""
    blocks = re.findall(r"^```text\n(.*?)^```$", markdown, flags=re.S | re.M)
    return [normalize(line) for block in blocks for line in block.splitlines() if line.strip()]


def pieces_in_order(pieces: list[str], text: str) -> bool:
    """Every non-empty piece occurs in `text`, each after the previous one."""
    pos = 0
    for piece in (p.strip() for p in pieces):
        if piece:
            pos = text.find(piece, pos)
            if pos < 0:
                return False
            pos += len(piece)
    return True


def quote_matches(quote: str, message: "Message") -> bool:
    """A quote documents a message when the message's fixed text, piece by piece, is the quote's."""
    return (pieces_in_order(normalize(message.text).split(PLACEHOLDER), quote)
            and pieces_in_order(quote.split("…"), normalize(message.text).replace(PLACEHOLDER, "…")))


def missing_from(markdown: str, messages: list[Message]) -> list[Message]:
    quotes = quoted_lines(markdown)
    return [m for m in messages if m.kind != "Reject" and m.stem() and not any(quote_matches(q, m) for q in quotes)]


if __name__ == "__main__":
    page = (REPO / "docs" / "troubleshooting.md")
    text = page.read_text() if page.is_file() else ""
    gaps = set(missing_from(text, error_messages()))
    for m in error_messages():
        print(f"{'MISSING ' if m in gaps else ''}{m.where} [{m.kind}] {m.text}")
