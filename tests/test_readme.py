"""README.md and docs/: short, true to the committed reports, and every path they name exists.

Standard library only (no torch, no cxrlib): it reads text files and JSON files.

- README.md has at most 250 lines and no calendar date (a README states what is true now;
  dated history goes to CHANGELOG.md).
- Every repository path README.md and docs/*.md name, in code spans, code blocks or Markdown
  links, exists, and so does every ``cxrlib.x.y`` module they name.
- Every number between ``<!-- demo-results -->`` and ``<!-- /demo-results -->`` in README.md
  is a number of the committed ``reports/demo/summary.json`` (between ``<!-- full-results -->``
  and its closing marker, of ``reports/demo-full/summary.json``) at the precision shown
  (``+0.010``: a value that rounds to 0.010). A comment ``<!-- from: primary/0 claims/0 -->``
  scopes the text after it (to the next such comment or the end of its paragraph or list item)
  to those entries of the summary. An estimate with its interval (``+0.032 (+0.009 to
  +0.055)``) must be one entry's estimate and CI together. The design's own numbers (the 5%
  and 200% of ``real_plus_synthetic_x2.f5``, the 5 of five seeds, the 95 of a 95% CI) are read
  from the summary too: its arm names, ``seeds`` and ``ci_level``; any other percentage fails,
  and so does an integer that is neither such a number nor a count of its scope. Outside those
  sections the README states no result (no number like 0.03). A number can still pass by equalling
  another value of its scope at the precision shown; narrow scopes make that unlikely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUMMARY = ROOT / "reports" / "demo" / "summary.json"
#: The README's checked sections: marker name -> (the summary its numbers come from, the fewest
#: numbers it states).
SECTIONS = {"demo-results": (SUMMARY, 20),
            "full-results": (ROOT / "reports" / "demo-full" / "summary.json", 6)}
MAX_LINES = 250

# A code-span word is taken for a repository path when it starts with one of these folders or
# is one of these top-level files; anything else (runs/, .venv/, generator/) is the user's.
TOP_DIRS = ("cxrlib", "notebooks", "params", "reports", "docs", "tests", "benchmarks", ".ci")
TOP_FILES = ("README.md", "CHANGELOG.md", "LICENSE", "Makefile", "pyproject.toml",
             "constraints.txt", "environment.yml", "conftest.py")
PLACEHOLDER = re.compile(r"[<>*$?{}\[\]|]|\.\.\.|XXX")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
COMMENT = re.compile(r"<!--.*?-->", re.S)
MODULE = re.compile(r"^cxrlib(?:\.[A-Za-z_]\w*)+$")
DATE = re.compile(r"\b(?:19|20)\d\d[-/.](?:0[1-9]|1[0-2])[-/.](?:0[1-9]|[12]\d|3[01])\b"
                  r"|\b(?:0?[1-9]|[12]\d|3[01])[./](?:0?[1-9]|1[0-2])[./](?:19|20)\d\d\b")
# A number as prose writes it: optional sign, thousands with commas, decimals, percent.
NUMBER = re.compile(r"(?<![\w.])([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%?)")
ARM = re.compile(r"[a-z_]+?(?:_x(\d+))?\.f(\d+)\b")
DECIMAL = r"[+-]?\d+\.\d+"
# An estimate, a few words, then its interval: "+0.010 macro AUROC (CI -0.005 to +0.025".
TRIPLE = re.compile(rf"(?<![\w.])(?P<est>{DECIMAL})[^0-9()]{{0,30}}?[(,]\s*(?:CI\s+)?"
                    rf"(?P<low>{DECIMAL})\s+to\s+(?P<high>{DECIMAL})")
FROM = re.compile(r"<!--\s*from:([^>]*?)-->")
RESULT_LIKE = re.compile(r"(?<![\w.])[+-]?0\.\d{2,}")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


# --- paths ----------------------------------------------------------------------------------

def code_words(text: str) -> Iterator[str]:
    """Every whitespace-separated word of the code blocks and code spans of a Markdown text."""
    chunks = FENCE.findall(text)
    chunks += SPAN.findall(FENCE.sub("", text))
    for chunk in chunks:
        for word in re.split(r"[\s\"'=(),;]+", chunk):
            word = word.lstrip("([").rstrip(".:;,)]")
            if word.startswith("./"):
                word = word[2:]
            if word:
                yield word


def named_paths(text: str) -> tuple[set[str], set[str], set[str]]:
    """(repository paths of code words, relative link targets, dotted cxrlib modules)."""
    paths, modules = set(), set()
    for word in code_words(text):
        if PLACEHOLDER.search(word):
            continue
        if MODULE.match(word):
            modules.add(word)
        elif word in TOP_FILES or word.split("/")[0] in TOP_DIRS and "/" in word:
            paths.add(word.split("#")[0].split("::")[0])
    links = set()
    for target in LINK.findall(COMMENT.sub("", text)):
        target = target.split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            links.add(target)
    return paths, links, modules


def module_problem(name: str) -> str | None:
    """Why ``cxrlib.a.b`` (a module, or a module's attribute) is not there, or None."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:n])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else (
            base / "__init__.py" if (base / "__init__.py").is_file() else None)
        if source is None:
            continue
        rest = parts[n:]
        if rest and not re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()):
            return f"{'.'.join(parts[:n])} has no {rest[0]}"
        return None
    return "no such module"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_page_names_exists(doc):
    text = doc.read_text()
    paths, links, modules = named_paths(text)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    missing += sorted(f"link {t}" for t in links if not (doc.parent / t).resolve().exists())
    missing += sorted(f"module {m}: {why}" for m in modules if (why := module_problem(m)))
    assert not missing, f"{doc.name} names what the repository does not hold: {missing}"


# --- the README's size and dates -------------------------------------------------------------

def test_readme_fits_on_a_few_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES})"


def test_readme_holds_no_date():
    dates = DATE.findall(README.read_text())
    assert not dates, f"README.md states dates {dates}: dated history goes to CHANGELOG.md"


# --- the demo's numbers ----------------------------------------------------------------------

def leaves(node, path: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, value) of every leaf of a JSON tree; lists also give their length."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + ".key", key
            yield from leaves(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        yield path + ".length", len(node)
        for item in node:
            yield from leaves(item, path)
    else:
        yield path, node


def records(node) -> Iterator[dict]:
    """Every JSON object of a tree."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from records(item)


def scoped(summary: dict, paths: list[str] | None):
    """The summary, or the entries that paths name (``primary/0``: the first primary row;
    ``exchange_rate/real_plus_synthetic_x2.f5``)."""
    if paths is None:
        return summary
    picked = {}
    for path in paths:
        node = summary
        for part in path.split("/"):
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise AssertionError(f"'from: {path}' names no entry of summary.json") from None
        picked[path] = node
    return picked


def numbers(tree) -> list[float]:
    """Every number of a JSON tree: numeric leaves and list lengths."""
    return [float(v) for _, v in leaves(tree)
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def intervals(record: dict) -> Iterator[tuple[float, float, float]]:
    """(estimate, CI low, CI high) of a summary entry, in each of the summary's layouts."""
    if "ci_low" in record:
        for key in ("delta", "rate", "value", "estimate"):
            if key in record:
                yield record[key], record["ci_low"], record["ci_high"]
    if "exchange_ci_low" in record:
        yield record["exchange_rate"], record["exchange_ci_low"], record["exchange_ci_high"]
    for key, value in record.items():
        if key.endswith("_ci") and key[:-3] in record and isinstance(value, list):
            yield record[key[:-3]], value[0], value[1]


def design_numbers(summary: dict) -> set[str]:
    """The design's numbers as the summary holds them: arm names give the real fractions (f5:
    5%) and the supplement (x2: 200%), ``seeds`` the number of seeds, ``ci_level`` 95%."""
    found = {str(len(summary["seeds"]))}
    for _, value in leaves(summary):
        if isinstance(value, str):
            for k, f in ARM.findall(value):
                found.add(f"{int(f)}%")
                if k:
                    found.add(f"{int(k) * 100}%")
    for path, value in leaves(summary):
        if path.endswith("ci_level") and isinstance(value, float):
            found.add(f"{round(value * 100)}%")
    return found


def results_section(text: str, name: str = "demo-results") -> str:
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, (
        f"README.md must hold one {start} ... {end} section with its report's numbers")
    return text.split(start, 1)[1].split(end, 1)[0]


def blocks(section: str) -> Iterator[str]:
    """The section's paragraphs and list items, each with its continuation lines."""
    block: list[str] = []
    for line in section.splitlines():
        if not line.strip() or line.lstrip().startswith(("- ", "* ")):
            if block:
                yield "\n".join(block)
            block = [line] if line.strip() else []
        else:
            block.append(line)
    if block:
        yield "\n".join(block)


def segments(block: str) -> Iterator[tuple[list[str] | None, str]]:
    """(summary paths, prose) of a block: a ``<!-- from: ... -->`` comment scopes the text after
    it, up to the next one or the block's end; text before any is unscoped (its decimals are
    looked up in the whole summary, its integers must be design numbers). Code spans, link
    targets and comments are not prose."""
    parts = FROM.split(block)
    for i in range(0, len(parts), 2):
        paths = parts[i - 1].split() if i else None
        prose = SPAN.sub(" ", LINK.sub(" ", COMMENT.sub(" ", parts[i])))
        yield paths, prose


def shows(value: float | None, token: str) -> bool:
    """Whether a value, rounded to the token's decimals, is what the token shows."""
    if value is None:
        return False
    decimals = len(token.split(".")[1]) if "." in token else 0
    return f"{value:.{decimals}f}" == token.lstrip("+").replace(",", "")


def unmatched_numbers(section: str, summary: dict) -> list[str]:
    """The numbers of the README's demo section that the summary does not hold as shown.

    An estimate with its interval (``+0.010 (CI -0.005 to +0.025)``, ``0.955, CI 0.92 to
    0.99``) must be one entry's estimate and CI. Any other decimal must be a number of the
    segment's scope; an integer a design number or a count of the scope; a percentage a design
    number.
    """
    design = design_numbers(summary)
    bad = []
    for block in blocks(section):
        for paths, prose in segments(block):
            tree = scoped(summary, paths)
            for match in TRIPLE.finditer(prose):
                est, low, high = match.group("est", "low", "high")
                if not any(shows(e, est) and shows(lo, low) and shows(hi, high)
                           for r in records(tree) for e, lo, hi in intervals(r)):
                    bad.append(f"{est} ({low} to {high})")
            prose = TRIPLE.sub(" ", prose)
            values = numbers(tree)
            for sign, whole, decimals, percent in NUMBER.findall(prose):
                token = f"{sign}{whole}{decimals}{percent}"
                if token.lstrip("+") in design:
                    continue
                if percent:  # a percentage is a design number, or wrong
                    pool = []
                elif decimals:
                    pool = values
                elif paths:  # an integer: a design number or a count the scope holds
                    pool = [v for v in values if v.is_integer()]
                else:
                    pool = []
                if not any(shows(v, token.rstrip("%")) for v in pool):
                    bad.append(token)
    return bad


@pytest.mark.parametrize("name", SECTIONS)
def test_every_result_number_in_the_readme_is_its_committed_summarys(name):
    source, fewest = SECTIONS[name]
    summary = json.loads(source.read_text())
    section = results_section(README.read_text(), name)
    found = [n for b in blocks(section) for _, p in segments(b) for n in NUMBER.findall(p)]
    assert len(found) >= fewest, "the section states the headline numbers with their CIs"
    bad = unmatched_numbers(section, summary)
    where = source.relative_to(ROOT)
    assert not bad, (f"README.md's {name} section states {bad}, which {where} does not hold "
                     "at the precision shown: copy the numbers from the summary")


def test_the_number_check_catches_numbers_the_summary_lacks():
    summary = json.loads(SUMMARY.read_text())
    seeds = str(len(summary["seeds"]) + 1)
    assert unmatched_numbers(f"- delta +0.987 and 0.912 at 641% of {seeds} seeds\n",
                             summary) == ["+0.987", "0.912", "641%", seeds]
    assert unmatched_numbers(f"- <!-- from: internal_test_images --> {seeds} seeds\n",
                             summary) == [seeds]
    # an estimate with its CI is one entry's: a CI of one row does not vouch for another's delta
    row = summary["manipulation_checks"][0]
    ci = f"({row['ci_low']:+.3f} to {row['ci_high']:+.3f})"
    right = f"- <!-- from: manipulation_checks --> {row['delta']:+.3f} {ci}\n"
    assert unmatched_numbers(right, summary) == []
    wrong = right.replace(f"{row['delta']:+.3f} (", f"{row['delta'] + 0.001:+.3f} (")
    assert unmatched_numbers(wrong, summary) == [f"{row['delta'] + 0.001:+.3f} {ci}"]
    # a scoped segment does not borrow a number from another entry of the summary
    other_df = f"{summary['primary'][1]['df']:.1f}"
    assert unmatched_numbers(f"- <!-- from: primary/0 --> t at {other_df} df\n", summary) == [
        other_df]


def test_the_readme_states_results_only_in_its_checked_sections():
    outside = README.read_text()
    for name in SECTIONS:
        outside = outside.replace(results_section(outside, name), " ")
    outside = FENCE.sub(" ", COMMENT.sub(" ", outside))
    stray = RESULT_LIKE.findall(SPAN.sub(" ", outside))
    assert not stray, f"results outside the checked sections: {stray}"
