"""The documentation against the repository: links resolve, shown commands use only defined flags, the
guidance table lists exactly the method registry, and README.md stays a front door (≤ 200 lines)."""
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').rglob('*.md'))
MAX_README_LINES = 200


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------
# Markdown pieces.

LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\bsrc="([^"]+)"')
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.S | re.M)
INLINE = re.compile(r'`([^`]+)`')
COMMAND = re.compile(r'python -m ((?:experiments|convert)\.\w+)((?:[^\n]|\\\n)*)')
HELP_FLAG = re.compile(r'^\s+--(?:\[no\])?([A-Za-z_][\w-]*):', re.M)


def links(text: str) -> list[str]:
    return [a or b for a, b in LINK.findall(text)]


def code(text: str) -> list[str]:
    """Fenced blocks, indented blocks (4 spaces after a blank line) and inline code spans."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub('', text)
    blocks += [m.group(0) for m in re.finditer(r'(?:^ {4}.*\n?)+', prose, re.M)]
    blocks += INLINE.findall(prose)
    return blocks


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, flags) of every `python -m experiments.X` / `convert.X` command shown in code:
    commented-out lines read as commands, backslash continuations joined, trailing comments dropped,
    `--noX` kept as written."""
    out = []
    for block in code(text):
        block = re.sub(r'^[ \t]*#[ \t]?', '', block, flags=re.M).replace('\\\n', ' ')
        block = re.sub(r'\s#\s[^\n]*', '', block)
        for m in COMMAND.finditer(block):
            try:
                words = shlex.split(m.group(2))
            except ValueError:
                words = m.group(2).split()
            out.append((m.group(1), [w[2:].split('=')[0] for w in words if w.startswith('--')]))
    return out


@functools.lru_cache(maxsize=None)
def defined_flags(module: str) -> frozenset[str]:
    """The flags `python -m module --helpfull` lists (absl's own included)."""
    run = subprocess.run([sys.executable, '-m', module, '--helpfull'], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    names = frozenset(HELP_FLAG.findall(run.stdout))
    assert names, f'{module} --helpfull listed no flags:\n{run.stdout[-2000:]}{run.stderr[-2000:]}'
    return names


def undefined(flags: list[str], defined: frozenset[str]) -> list[str]:
    return [f for f in flags if f not in defined and not (f.startswith('no') and f[2:] in defined)]


# ---------------------------------------------------------------------------------------------------
# (a) links and images

def test_pages_exist():
    names = {rel(p) for p in PAGES}
    assert {'README.md', 'docs/README.md', 'docs/guidance.md', 'docs/edm2-spec.md', 'docs/toy2d-spec.md'} <= names


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_relative_links_resolve(page):
    text = page.read_text()
    broken = []
    for target in links(text):
        if re.match(r'[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split('#')[0]).resolve()
        if not path.exists() or ROOT not in path.parents:
            broken.append(target)
    assert not broken, f'{rel(page)}: links to missing files: {broken}'


def test_link_parser_sees_markdown_and_html():
    text = '![a](x.png) [b](docs/y.md#z) <img src="z.png" width="9"> [c](https://e.org)'
    assert links(text) == ['x.png', 'docs/y.md#z', 'z.png', 'https://e.org']


# ---------------------------------------------------------------------------------------------------
# (b) commands use defined flags

def test_command_parser():
    text = ('```bash\npython -m experiments.generate --net=a \\\n    --seeds=0-3 --grid 4  # --not_a_flag\n'
            '# = python -m experiments.train --preset=p \\\n#     --run_dir=r\n```\n'
            'Inline: `python -m convert.edm2 --src=x --nooverwrite`.\n\n'
            '    python -m experiments.toy2d --quick\n')
    assert commands(text) == [('experiments.generate', ['net', 'seeds', 'grid']),
                              ('experiments.train', ['preset', 'run_dir']),
                              ('experiments.toy2d', ['quick']),
                              ('convert.edm2', ['src', 'nooverwrite'])]
    assert undefined(['src', 'nooverwrite', 'renamed'], frozenset({'src', 'overwrite'})) == ['renamed']


SHOWN = sorted({(rel(p), module, tuple(flags)) for p in PAGES for module, flags in commands(p.read_text())})


def test_commands_are_shown():
    modules = {module for _, module, _ in SHOWN}
    assert {'experiments.generate', 'experiments.evaluate', 'experiments.train', 'convert.edm2'} <= modules


@pytest.mark.slow
@pytest.mark.parametrize('page, module, flags', SHOWN, ids=lambda v: v if isinstance(v, str) else None)
def test_commands_use_defined_flags(page, module, flags):
    bad = undefined(list(flags), defined_flags(module))
    assert not bad, f'{page}: `python -m {module}` shown with flags it does not define: ' \
                    f'{", ".join("--" + f for f in bad)}'


# ---------------------------------------------------------------------------------------------------
# (c) the guidance table is the registry

def table_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first header cell is `first_header`, as header → cell."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith('|'):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip('|').split('|')))))
            return rows
    raise AssertionError(f'no table with first column {first_header!r}')


def strength_cell(m) -> str:
    """How the guidance table writes a method's strength (written out here, not taken from methods)."""
    if m.strength is None:
        return '—'
    return f'{m.strength} ({"required" if m.default is None else f"default {m.default:g}"})'


def test_guidance_table_is_the_registry():
    from edm2_jax import methods
    rows = table_rows((ROOT / 'docs' / 'guidance.md').read_text(), 'method')
    names = [r['method'] for r in rows]
    assert all(n.startswith('`') and n.endswith('`') for n in names), names
    assert [n.strip('`') for n in names] == list(methods.NAMES)
    for row in rows:
        m = methods.get(row['method'].strip('`'))
        assert row['guide'] == m.guide, (m.name, row['guide'])
        assert row['strength'] == strength_cell(m), (m.name, row['strength'])
        assert (row['paper'] or '—') == (m.paper or '—'), (m.name, row['paper'])


# ---------------------------------------------------------------------------------------------------
# (d) README is a front door

def test_readme_is_short():
    n = len((ROOT / 'README.md').read_text().splitlines())
    assert n <= MAX_README_LINES, f'README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})'
