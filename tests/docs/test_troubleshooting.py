"""docs/troubleshooting.md cannot drift from the code: every error message in lora_engine/,
indextts_integration/ and scripts/ is quoted there, and every quote there still matches a message."""
import re

from tests.docs.error_messages import PLACEHOLDER, REPO, error_messages, missing_from, quote_matches, quoted_lines

PAGE = REPO / "docs" / "troubleshooting.md"


def test_the_scan_finds_the_messages_it_should():
    messages = error_messages()
    texts = [m.text for m in messages]
    assert len(messages) > 100
    assert any("matched no module. Closest module names:" in t for t in texts)  # raise ValueError(f"...")
    assert any("base fingerprint mismatch" in t for t in texts)  # raise Error(msg + "...") via a local name
    assert any(t.startswith("learning_rate must be > 0") for t in texts)  # need(ok, msg)
    assert any(t.startswith("error: adapter file") for t in texts)  # sys.exit("error: ...")
    assert {m.text for m in messages if m.kind == "Reject"} >= {"missing", "too_long", "silent"}


def test_every_error_message_is_documented():
    missing = missing_from(PAGE.read_text(), error_messages())
    assert not missing, "add these messages to docs/troubleshooting.md (in a ```text block, … for values):\n" + \
        "\n".join(f"  {m.where}: {m.text.replace(PLACEHOLDER, '…')}" for m in missing)


def test_every_documented_message_still_exists():
    messages = [m for m in error_messages() if m.kind != "Reject"]
    stale = [q for q in quoted_lines(PAGE.read_text()) if not any(quote_matches(q, m) for m in messages)]
    assert not stale, "these quotes in docs/troubleshooting.md match no message in the code:\n" + "\n".join(stale)


def test_every_reject_reason_is_in_the_table_and_only_those():
    text = PAGE.read_text()
    section = text.split("## Rejected utterances (rejects.jsonl)", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    in_code = {m.text for m in error_messages() if m.kind == "Reject"}
    prepare = (REPO / "indextts_integration" / "prepare.py").read_text()
    in_code |= set(re.findall(r'"reason": "(\w+)"', prepare))  # the catch-all reason
    assert documented == in_code
