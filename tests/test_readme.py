"""Every snippet of README.md runs as written (shortened where it would train for minutes).

* Python blocks are executed as they stand.
* Shell blocks are run line by line: `pip install` lines with `--dry-run --no-index`
  (the packages are already installed; network options dropped), `mgup-dist train` with
  flags appended that shorten the run, `mgup-dist plot` on those runs, launch commands
  with `DRY_RUN=1` (tests/test_launch.py parses their trainer flags), and the test command
  by collecting the suite.  A line no rule covers fails the test, so a new snippet needs a
  rule here.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Appended to a README `mgup-dist train` line: later flags win, so this is the same run, short.
SHORT_TRAIN = ["--steps", "2", "--eval-every", "2", "--eval-tokens", "1024", "--log-every", "1", "--save-every", "0",
               "--no-progress", "--no-tensorboard"]
# Words that describe how the project was made rather than the product.
HISTORY = re.compile(r"\b(issue [0-9]+|sessions?|lent|landed|the task|this VM|these machines)\b", re.I)


def blocks(text: str, lang: str):
    """The contents of the fenced code blocks of language ``lang``."""
    out, cur, buf = [], None, []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            if cur is None:
                cur, buf = s[3:].strip(), []
            else:
                if cur == lang:
                    out.append("\n".join(buf) + "\n")
                cur = None
        elif cur is not None:
            buf.append(line)
    return out


def shell_lines(text: str):
    out = []
    for block in blocks(text, "bash"):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _env(**kw):
    e = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(kw)
    return e


def _run(argv, cwd, env=None, timeout=600):
    r = subprocess.run(argv, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _pip_dry(words):
    """`pip install ...` as a dry run against what is installed: no index, no build isolation
    (both would need the network); `--index-url URL` is dropped with it."""
    assert words[:2] == ["pip", "install"], words
    rest, i = [], 2
    while i < len(words):
        if words[i] in ("--index-url", "--extra-index-url"):
            assert words[i + 1].startswith("https://"), words
            i += 2
            continue
        rest.append(words[i])
        i += 1
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", *rest]


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


def test_readme_test_command_is_what_ci_runs():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("pip install")]
    assert len(ci) == 1
    assert ci[0] in shell_lines(README.read_text())


def test_product_files_do_not_narrate_their_making():
    files = [README, ROOT / "launch" / "README.md", *DOCS.glob("*.md"), *(ROOT / "configs").rglob("*.*"),
             *(ROOT / "launch").glob("*.sh*"), *(ROOT / "launch" / "slurm").glob("*"),
             *(ROOT / "mgup_dist").rglob("*.py"), *(p for p in (ROOT / "tests").glob("*.py") if p.name != pathlib.Path(__file__).name)]
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_readme_python_snippets_run(tmp_path):
    code = blocks(README.read_text(), "python")
    assert code, "README has no Python snippet"
    for i, src in enumerate(code):
        f = tmp_path / f"snippet_{i}.py"
        f.write_text(src)
        r = _run([sys.executable, str(f)], cwd=tmp_path, timeout=600)
        if "loss" in src:                         # the quick start prints step and loss
            lines = r.stdout.strip().splitlines()
            assert lines and all(len(ln.split()) == 2 for ln in lines), r.stdout
            assert all(float(ln.split()[1]) > 0 for ln in lines), r.stdout


def test_readme_shell_snippets_run(tmp_path):
    lines = shell_lines(README.read_text())
    assert lines
    trained, done = [], []
    for line in lines:
        for part in [p.strip() for p in line.split("&&")]:
            words = shlex.split(part, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words[:2] == ["pip", "install"]:
                _run(_pip_dry(words), cwd=ROOT, timeout=300)
            elif words[:2] == ["mgup-dist", "train"]:
                r = _run([*words, *SHORT_TRAIN], cwd=tmp_path)
                # A run the README already made reports itself complete (a user following it top to bottom).
                out = re.search(r"(?:outputs in|is already complete \(\d+ steps\) in) (\S+)", r.stdout + r.stderr)
                assert out, r.stdout
                run_dir = tmp_path / out.group(1)
                for f in ("metrics.jsonl", "summary.json", "config.json", "lr.png", "train_loss.png", "val_loss.png",
                          "val_loss_time.png"):
                    assert (run_dir / f).is_file(), f
                trained.append(out.group(1))
            elif words[:2] == ["mgup-dist", "plot"]:
                out_i = words.index("--out")
                for d in words[2:out_i] + words[out_i + 2:]:
                    if d.startswith("runs/"):
                        assert d in trained, f"{part}: {d} is not made by a README command above it"
                r = _run(words, cwd=tmp_path)
                assert "| optimizer |" in r.stdout
                outdir = tmp_path / words[words.index("--out") + 1]
                assert {p.name for p in outdir.glob("*.png")} >= {"lr.png", "train_loss.png", "val_loss.png"}
            elif words and words[0].startswith("launch/"):
                e = _env(**env, DRY_RUN="1")
                r = _run(["bash", *words], cwd=ROOT, env=e, timeout=60)
                assert "mgup_dist.train" in r.stdout
            elif words[:4] == ["python", "-m", "pytest", "-q"]:
                # Its options parse and its path is there; collecting every module here would
                # repeat what running the suite does (this test's own module stands for it).
                assert "tests" in words[4:], words
                args = ["tests/test_readme.py" if w == "tests" else w for w in words[4:]]
                r = _run([sys.executable, "-m", "pytest", "-q", "--collect-only", *args], cwd=ROOT, timeout=600)
                assert re.search(r"\b[1-9]\d* tests? collected", r.stdout), r.stdout[-2000:]
            else:
                pytest.fail(f"README shell line with no rule in tests/test_readme.py: {part}")
            done.append(part)
    assert any(d.startswith("mgup-dist train") for d in done) and any(d.startswith("pip install") for d in done)


# --------------------------------------------------------------------------- docs/


def _doc_commands():
    """`mgup-dist CMD ...` and `python -m mgup_dist.MOD ...` lines in the code blocks of the docs."""
    out = []
    for f in [README, ROOT / "launch" / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = f.read_text()
        for block in blocks(text, "bash") + blocks(text, ""):
            for line in block.splitlines():
                line = line.strip()
                m = re.match(r"(?:for .*; do )?(mgup-dist \S+|python -m mgup_dist\.\S+)(.*?)(?:; done)?$", line)
                if m:
                    out.append((f.name, m.group(1), shlex.split(m.group(2), comments=True)))
    return out


def test_doc_commands_name_real_commands_and_flags():
    cmds = _doc_commands()
    assert {c[1] for c in cmds} >= {"mgup-dist train", "mgup-dist plot", "mgup-dist counterexample",
                                    "python -m mgup_dist.bench", "python -m mgup_dist.opcount",
                                    "python -m mgup_dist.bench_selection"}
    helps = {}
    for where, cmd, args in cmds:
        if cmd not in helps:
            argv = cmd.split()
            argv = [sys.executable, "-m", "mgup_dist.cli", *argv[1:]] if argv[0] == "mgup-dist" else \
                [sys.executable, *argv[1:]]
            helps[cmd] = _run([*argv, "--help"], cwd=ROOT, timeout=300).stdout
        for a in args:
            if a.startswith("--"):
                assert a.split("=")[0] in helps[cmd], f"{where}: {cmd} has no option {a}"


def test_doc_code_blocks_are_well_formed():
    import json

    n = 0
    for f in sorted(DOCS.glob("*.md")):
        text = f.read_text()
        for src in blocks(text, "python"):
            compile(src, f"{f.name}:python", "exec")
            n += 1
        for src in blocks(text, "json"):
            json.loads(src if src.lstrip().startswith("{") else "{" + src + "}")
            n += 1
    assert n >= 5
