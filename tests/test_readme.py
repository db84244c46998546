"""The README is checked against the code it describes.

* "Configuration reference": one table per config section (``Top level``, ``model``, ``loss``,
  ``train``, ``data``, ``federation``) with columns key | default | meaning. Its keys are exactly
  the dataclass fields of ``smm_model/config.py``, in their order; each default is the dataclass
  default rendered as one line of YAML (flow style, as ``render_default`` does); a field with a
  fixed set of values lists every value in its meaning.
* Every ``smm COMMAND`` in the README's code (fenced blocks and inline code) is a command of
  ``smm_model/cli.py`` and every ``--option`` given to it is defined in that command's module;
  every ``make TARGET`` is a Makefile target; every ``configs/*.yaml`` and repository path named
  exists; the Flower run config and node config keys shown are the ones the app reads.

Regenerating the reference tables after a config change is mechanical::

    .venv/bin/python tests/test_readme.py

prints the section's tables: meanings already in the README are kept; a new field's meaning is
taken from its trailing ``# comment`` in ``smm_model/config.py`` (else ``TODO``). Paste the output
over the tables (the prose between them is not generated).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tests/test_readme.py` from anywhere
    sys.path.insert(0, str(ROOT))

from smm_model import config as C  # noqa: E402  (imports PyYAML only: fast)
from smm_model.cli import COMMANDS  # noqa: E402

README = ROOT / "README.md"
REFERENCE_HEADING = "## Configuration reference"
TOP_LEVEL = "Top level"
#: Files the README names that are produced, not committed (so they may be absent in a checkout).
GENERATED_PATHS = {"benchmarks/results/report_first_page.png"}
#: Fields whose value is one of a fixed set: the meaning must name every value.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "arch"): C.ARCHS,
    ("model", "tasks"): C.TASKS,
    ("model", "layout"): C.LAYOUTS,
    ("model", "position_bias"): C.POSITION_BIAS,
    ("train", "optimizer"): C.OPTIMIZERS,
    ("train", "coordination"): C.COORDINATION,
    ("data", "genomics_policy"): C.GENOMICS_POLICIES,
    ("data", "patch_norm"): C.PATCH_NORMS,
    ("federation", "strategy"): C.STRATEGIES,
    ("federation", "site_optimizer"): C.SITE_OPTIMIZERS,
}


# --- the schema side --------------------------------------------------------------------------------

def render_default(value: Any) -> str:
    """A default as one line of YAML, as the README shows it (tuples as lists, None as null)."""
    text = yaml.safe_dump(C.to_dict(value), default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def schema_sections() -> dict[str, type]:
    """README section name -> dataclass: the top level's plain fields, then one per nested section."""
    out: dict[str, type] = {TOP_LEVEL: C.ExperimentConfig}
    hints = typing.get_type_hints(C.ExperimentConfig)
    out.update({f.name: hints[f.name] for f in dataclasses.fields(C.ExperimentConfig)
                if dataclasses.is_dataclass(hints[f.name])})
    return out


def schema_rows(section: str) -> list[tuple[str, str]]:
    """(key, rendered default) per field of a section, in declaration order."""
    cls = schema_sections()[section]
    default = cls()
    return [(f.name, render_default(getattr(default, f.name))) for f in dataclasses.fields(cls)
            if not (section == TOP_LEVEL and f.name in schema_sections())]


def source_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the dataclass's source."""
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s{4}(\w+):[^#\n]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


# --- the README side --------------------------------------------------------------------------------

def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def reference_section(text: str) -> str:
    start = text.find("\n" + REFERENCE_HEADING + "\n")
    assert start >= 0, f"README.md has no '{REFERENCE_HEADING}' section"
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def readme_tables(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """Section -> [(key, default, meaning)] from the reference's ``### `section``` tables."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    current: str | None = None
    for line in reference_section(text).splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
            m = re.match(r"`([\w.]+)`", heading)
            current = m.group(1) if m else heading
            assert current not in tables, f"README reference: section {current!r} appears twice"
            tables[current] = []
        elif line.startswith("| `") and current is not None:
            cells = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))
            assert len(cells) == 3, f"README reference row has not 3 cells (escape a | as \\|): {line!r}"
            key, default, meaning = (c.strip() for c in cells)
            tables[current].append((key.strip("`"), default.removeprefix("`").removesuffix("`"), meaning))
    return tables


def generate_tables(text: str | None = None) -> str:
    """The reference tables as Markdown, keeping the README's meanings where it has them."""
    have = readme_tables(text) if text and REFERENCE_HEADING in text else {}
    blocks = []
    for section, cls in schema_sections().items():
        meanings = {k: m for k, _, m in have.get(section, [])}
        comments = source_comments(cls)
        lines = [f"### {section}" if section == TOP_LEVEL else f"### `{section}`", "",
                 "| key | default | meaning |", "| --- | --- | --- |"]
        for key, default in schema_rows(section):
            meaning = meanings.get(key) or comments.get(key, "TODO").replace("|", "\\|")
            lines.append(f"| `{key}` | `{default}` | {meaning} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def code_snippets(text: str) -> list[str]:
    """Fenced code blocks and inline code spans outside them."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + re.findall(r"`([^`\n]+)`", prose)


def shell_segments(snippet: str) -> list[str]:
    """Simple commands: continuations joined, comments dropped, split at ; && || | do then."""
    joined = re.sub(r"\\\n\s*", " ", snippet)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        out += [s.strip() for s in re.split(r";|&&|\|\||\||\bdo\b|\bthen\b", line) if s.strip()]
    return out


def smm_invocations(text: str) -> list[tuple[str, str]]:
    """(command, the rest of the simple command) for every ``smm COMMAND`` in the README's code."""
    found = []
    for snippet in code_snippets(text):
        for seg in shell_segments(snippet):
            for m in re.finditer(r"(?:^|\s)(?:\S*/)?smm\s+([A-Za-z][\w-]*)(.*)$", seg):
                found.append((m.group(1), m.group(2)))
    return found


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


# --- tests ------------------------------------------------------------------------------------------

def test_two_commands_at_the_top():
    text = readme_text()
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    assert first_block and text.find("\n## ") > first_block.start(), "the first code block must precede any section"
    assert re.search(r"^make demo\b", first_block.group(1), re.M) and re.search(r"^make test\b", first_block.group(1), re.M)


def test_reference_sections_are_the_config_sections():
    assert list(readme_tables(readme_text())) == list(schema_sections())


@pytest.mark.parametrize("section", list(schema_sections()))
def test_reference_keys_are_the_dataclass_fields(section):
    shown = [k for k, _, _ in readme_tables(readme_text()).get(section, [])]
    fields = [k for k, _ in schema_rows(section)]
    assert set(shown) == set(fields), (f"README reference {section}: missing {sorted(set(fields) - set(shown))}, "
                                       f"unknown {sorted(set(shown) - set(fields))} (python tests/test_readme.py)")
    assert shown == fields, f"README reference {section}: keys out of declaration order"


@pytest.mark.parametrize("section", list(schema_sections()))
def test_reference_defaults_are_the_dataclass_defaults(section):
    shown = {k: d for k, d, _ in readme_tables(readme_text()).get(section, [])}
    wrong = {k: (shown.get(k), d) for k, d in schema_rows(section) if shown.get(k) != d}
    assert not wrong, f"README reference {section}: (shown, actual) defaults differ: {wrong}"


def test_reference_meanings_name_every_allowed_value():
    tables = readme_tables(readme_text())
    for (section, key), values in CHOICES.items():
        meaning = {k: m for k, _, m in tables.get(section, [])}.get(key, "")
        missing = [v for v in values if f"`{v}`" not in meaning]
        assert not missing, f"README reference {section}.{key}: the meaning does not name {missing}"
    for section, rows in tables.items():
        assert all(m and m != "TODO" for _, _, m in rows), f"README reference {section}: a meaning is empty or TODO"


def test_reference_rows_are_what_the_generator_writes():
    text = readme_text()
    shown = [ln for ln in reference_section(text).splitlines() if ln.startswith("| `")]
    generated = [ln for ln in generate_tables(text).splitlines() if ln.startswith("| `")]
    assert shown == generated, "README reference rows differ from `python tests/test_readme.py` (formatting?)"


def test_smm_commands_exist():
    calls = smm_invocations(readme_text())
    assert len(calls) > 10, "too few `smm` commands found: is the parser broken?"
    unknown = sorted({c for c, _ in calls if c not in COMMANDS})
    assert not unknown, f"README names smm commands that smm_model/cli.py does not have: {unknown}"


def test_smm_options_exist():
    bad = set()
    for cmd, rest in smm_invocations(readme_text()):
        if cmd not in COMMANDS:
            continue
        module = COMMANDS[cmd][0].partition(":")[0]
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            if f'"{opt}"' not in source:
                bad.add(f"smm {cmd} {opt}")
    assert not bad, f"README uses options the commands do not define: {sorted(bad)}"


def test_make_targets_exist():
    targets = makefile_targets()
    named = {m for s in code_snippets(readme_text()) for seg in shell_segments(s)
             for m in re.findall(r"(?:^|\s)make\s+([a-z][\w-]*)", seg)}
    assert {"demo", "test"} <= named
    assert not named - targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_named_configs_and_paths_exist():
    text = readme_text()
    configs = set(re.findall(r"(?<![\w/.-])(configs/[\w.-]+\.yaml)", text))
    assert configs, "no configs/*.yaml named"
    paths = set(re.findall(r"(?<![\w/.-])((?:smm_model|client|server|benchmarks|tests|configs|requirements|\.ci)"
                           r"/[\w./-]*\w)", text))
    missing = sorted(p for p in configs | paths if p not in GENERATED_PATHS and not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_flower_run_config_keys():
    text = readme_text()
    app_keys = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    blocks = re.findall(r"<<'TOML'\n(.*?)^TOML$", text, flags=re.S | re.M)
    assert blocks, "the coordinator guide's run-config.toml is missing"
    for b in blocks:
        assert set(tomllib.loads(b)) <= app_keys
    for key in app_keys:
        assert f"`{key}`" in text, f"README does not explain the run config key {key}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the README's headings (outside code blocks)."""
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    anchors: set[str] = set()
    for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        n, base = 0, slug
        while slug in anchors:
            n += 1
            slug = f"{base}-{n}"
        anchors.add(slug)
    return anchors


def test_internal_links_resolve():
    text = readme_text()
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "no internal links found"
    assert not links - heading_anchors(text), f"README links to missing headings: {sorted(links - heading_anchors(text))}"


def test_node_config_keys():
    text = readme_text()
    source = "".join((ROOT / f).read_text() for f in ("client/local/round.py", "client/app.py",
                                                        "smm_model/contract/disclosure.py"))
    keys = {k for s in re.findall(r"--node-config '([^']*)'", text) for k in re.findall(r"([\w-]+)=", s)}
    keys |= set(re.findall(r"`([a-z]+-[a-z]+)=\"", text))
    assert {"site-dir", "site-name"} <= keys
    assert all(f'"{k}"' in source for k in keys), f"node config keys the app does not read: {keys}"


if __name__ == "__main__":
    print(generate_tables(readme_text() if README.exists() else None), end="")
