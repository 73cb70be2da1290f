"""The documentation stays true: every relative link and image resolves, README.md and the model card stay
short, and every ``--flag`` the docs give a job exists in that job's ``--help``.

Fast (a few seconds): the eight ``--help`` outputs run in parallel subprocesses; no Ray is started.
Each check is a function of the text it is given, and the tests below also feed it broken text, so a
check that could not fail would show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = ROOT / "lib" / "cxr" / "assets" / "models" / "default" / "MODEL_CARD.md"
JOBS = tuple(
    sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_"))
)  # score, nightly, train, tune, ... (a new job needs a page)
MAX_BYTES = 10 * 1024


def doc_files() -> list[Path]:
    files = [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        MODEL_CARD,
        ROOT / "cluster" / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
    ]
    return [f for f in files if f.is_file()]


# ------------------------------------------------------------------------------------------- links

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of [...] (a badge)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)


def link_targets(text: str) -> list[str]:
    """Every link and image target of a Markdown text, code blocks and code spans left out."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(text) + REF_DEF.findall(text) + HTML_SRC.findall(text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown text's headings: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(doc: Path, text: str | None = None) -> list[str]:
    """The relative targets in ``doc`` whose file part names nothing on disk, or whose anchor names no
    heading of the Markdown file it points into (absolute URLs are not checked)."""
    text = doc.read_text() if text is None else text
    broken = []
    for target in link_targets(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # https:, mailto:, ...
        path, _, anchor = unquote(target).partition("#")
        path = path.split("?", 1)[0]
        file = doc.parent / path if path else doc
        if path.startswith("/") or (path and not file.exists()):
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(text if file == doc else file.read_text()):
            broken.append(target)
    return broken


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(doc):
    assert link_targets(doc.read_text()) or doc.name in {"CHANGELOG.md"}, (
        f"{doc} links nowhere: the parser missed them?"
    )
    assert broken_links(doc) == [], f"{doc.relative_to(ROOT)}: links to files that do not exist"


def test_the_docs_the_readme_promises_exist():
    expected = (
        [ROOT / "docs" / "jobs" / f"{job}.md" for job in JOBS]
        + [
            ROOT / "docs" / f"{name}.md"
            for name in ("operations", "performance", "checkpoint-format", "architecture", "development", "experiments")
        ]
        + [ROOT / "CHANGELOG.md", MODEL_CARD]
    )
    assert [p for p in expected if not p.is_file()] == []
    readme = (ROOT / "README.md").read_text()
    for job in JOBS:
        assert f"docs/jobs/{job}.md" in readme, f"README's job table does not link docs/jobs/{job}.md"


def links_leaving(doc: Path, text: str | None = None) -> list[str]:
    """Relative targets of ``doc`` outside its own folder: they break once the package is installed."""
    text = doc.read_text() if text is None else text
    here = doc.parent.resolve()
    return [
        t
        for t in link_targets(text)
        if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)
        and here not in (here / unquote(t.split("#", 1)[0])).resolve().parents
    ]


def test_model_card_links_work_from_the_installed_package(tmp_path):
    assert links_leaving(MODEL_CARD) == [], "the model card ships in the wheel: link only files beside it"
    assert "assets/**/*" in (ROOT / "pyproject.toml").read_text()  # package-data: what lies beside it ships
    assert links_leaving(tmp_path / "card.md", "![x](rates.png) [y](../../docs/audit/x.png)") == [
        "../../docs/audit/x.png"
    ]


def test_link_check_can_fail(tmp_path):
    (tmp_path / "there.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    doc = tmp_path / "doc.md"
    (tmp_path / "other.md").write_text("# Other page\n## `jobs/x.py`: options (all)\n")
    text = (
        "# Top\n[ok](there.png) ![ok](./there.png) [ok](sub/) [web](https://example.org/x.md)\n"
        "[in page](#top) [there](other.md#other-page) [code](other.md#jobsxpy-options-all)\n"
        "`[in code](gone.md)`\n```\n[in a block](gone.md)\n```\n"
    )
    assert broken_links(doc, text) == []
    text += (
        '[gone](missing.md) ![gone](img/missing.png) [anchored](missing.md#part) <img src="nope.png">\n'
        "[no heading](other.md#options) [not here](#bottom)\n[ref]: gone-ref.md\n"
    )
    assert broken_links(doc, text) == [
        "missing.md",
        "img/missing.png",
        "missing.md#part",
        "other.md#options",
        "#bottom",
        "gone-ref.md",
        "nope.png",
    ]


# ------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("doc", [ROOT / "README.md", MODEL_CARD], ids=["README.md", "MODEL_CARD.md"])
def test_readme_and_model_card_stay_short(doc):
    size = len(doc.read_bytes())
    assert size <= MAX_BYTES, f"{doc.relative_to(ROOT)} is {size} bytes; at most {MAX_BYTES}: move detail into docs/"


def test_model_card_keeps_its_standard_sections_intended_use_first():
    text = MODEL_CARD.read_text()
    headings = [h.lower() for h in re.findall(r"^## (.+)$", text, re.M)]
    wanted = [
        "model details",
        "intended use",
        "factors",
        "metrics",
        "training data",
        "evaluation data",
        "quantitative analyses",
        "ethical considerations",
        "caveats and recommendations",
    ]
    found = [next((i for i, h in enumerate(headings) if h.startswith(w)), None) for w in wanted]
    assert None not in found, f"missing sections: {[w for w, i in zip(wanted, found) if i is None]}"
    assert found[1] <= 1, "intended use comes first (right after the model details)"


# ------------------------------------------------------------------------------------------- job flags

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# an option's own line in --help (indented 2-4 spaces, in any argument group), not a mention in help text
OPTION_LINE = re.compile(r"^ {2,4}(?:-\w, )?(--[a-z][a-z0-9-]*)", re.M)
SUBCOMMANDS = re.compile(r"^ {2}\{([\w,-]+)\}$", re.M)  # argparse's line of a job's subcommands
SCRIPT = re.compile(r"(?<![\w./-])[\w./-]*\.py\b")  # jobs/score.py, train.py, benchmarks/score.py, ...


def script_owner(script: str) -> str | None:
    """The job a script name stands for (``jobs/train.py``, ``train.py``); None for any other script."""
    name = script[len("jobs/") :] if script.startswith("jobs/") else script
    return name[:-3] if name[:-3] in JOBS and "/" not in name else None


@lru_cache(maxsize=1)
def job_flags() -> dict[str, frozenset[str]]:
    """Every job's options, read from its own ``--help`` as a user would run it (PYTHONPATH=lib)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "lib"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    def run_help(job: str, *sub: str) -> str:
        out = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / f"{job}.py"), *sub, "--help"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"jobs/{job}.py {' '.join(sub)} --help failed: {out.stderr[-2000:]}"
        return out.stdout

    def help_of(job: str) -> tuple[str, str]:
        text = run_help(job)
        commands = SUBCOMMANDS.search(text)  # a job with subcommands (table.py): their options too
        for sub in commands.group(1).split(",") if commands else ():
            text += run_help(job, sub)
        return job, text

    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = dict(pool.map(help_of, JOBS))
    return {job: frozenset(OPTION_LINE.findall(text)) for job, text in helps.items()}


def flags_by_job(text: str, page_job: str | None) -> list[tuple[str, str]]:
    """(job, --flag) pairs a text names. On a line, a flag belongs to the job script named last before it
    (``score.py --model``, ``python jobs/train.py --gpu``); a flag before any such name belongs to the page's
    own job (docs/jobs/<job>.md), or to none (other pages: ``ray job submit --working-dir`` is not a job's);
    after another script (``benchmarks/score.py --data``) to none."""
    pairs = []
    for line in text.splitlines():
        marks = [(m.start(), script_owner(m.group(0))) for m in SCRIPT.finditer(line)]
        for m in FLAG.finditer(line):
            owner = next((job for pos, job in reversed(marks) if pos < m.start()), page_job)
            if owner:
                pairs.append((owner, m.group(0)))
    return pairs


def unknown_flags(text: str, page_job: str | None, known: dict[str, frozenset[str]]) -> list[str]:
    return sorted({f"{job}.py {flag}" for job, flag in flags_by_job(text, page_job) if flag not in known[job]})


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_the_docs_give_a_job_is_in_its_help(doc):
    page_job = doc.stem if doc.parent == ROOT / "docs" / "jobs" else None
    assert unknown_flags(doc.read_text(), page_job, job_flags()) == [], (
        f"{doc.relative_to(ROOT)} names options the job lacks"
    )


def test_every_job_page_names_its_options():
    flags = job_flags()
    for job in JOBS:
        named = {
            flag
            for owner, flag in flags_by_job((ROOT / "docs" / "jobs" / f"{job}.md").read_text(), job)
            if owner == job
        }
        missing = sorted(flags[job] - named - {"--help"})
        assert missing == [], f"docs/jobs/{job}.md does not document {missing}"


def test_flag_check_can_fail():
    known = job_flags()
    assert "--input" in known["score"] and "--table" in known["nightly"] and "--input" not in known["train"]
    good = (
        "`--input URI` and `--all-views`; train with `train.py --crop lung`, then `python jobs/score.py --model runs/x`"
    )
    assert unknown_flags(good, "score", known) == []
    assert unknown_flags("`ray job submit --working-dir .`", None, known) == []
    assert unknown_flags("`benchmarks/score.py --data d` then `score.py --input i`", "train", known) == []
    bad = good + "\n`--no-such-flag` | `--inputs`\n`jobs/train.py --table t`"
    assert unknown_flags(bad, "score", known) == ["score.py --inputs", "score.py --no-such-flag", "train.py --table"]
