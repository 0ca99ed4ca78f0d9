"""README.md and the pages under docs/: their links lead somewhere, their `qubax` commands exist with the
options they show, their shell examples say where each variable comes from, and the README's first image
(a test key, the `openai` SDK, curl, `qubax generate`) is made by its own text, run as written."""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import httpx
import pytest

from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell", "console"}


def blocks(text: str) -> list[tuple[str, str]]:
    """Each fenced code block as (language, body), in order."""
    found: list[tuple[str, str]] = []
    language: str | None = None
    body: list[str] = []
    for line in text.split("\n"):
        fence = line.strip().startswith("```")
        if language is None and fence:
            language, body = line.strip()[3:].strip(), []
        elif language is not None and fence:
            found.append((language, "\n".join(body)))
            language = None
        elif language is not None:
            body.append(line)
    return found


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?)\s*$", prose(text), flags=re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


def links(text: str) -> list[str]:
    """Every inline link's target, outside code (a code span's `](` is not a link)."""
    outside = re.sub(r"`[^`\n]*`", "``", prose(text))
    return re.findall(r"\]\(([^)\s]+)\)", outside)


def shell_blocks(text: str) -> list[str]:
    return [body for language, body in blocks(text) if language in SHELLS]


def command_lines(text: str) -> list[str]:
    """Every line of code (fenced, or an inline code span) that runs `qubax`, continuations joined."""
    lines = [line for _, body in blocks(text) for line in body.replace("\\\n", " ").split("\n")]
    lines += re.findall(r"`([^`\n]+)`", prose(text))
    return [line for line in lines if re.search(r"(?<![\w./\[-])(?:\./|\.venv/bin/)?qubax\s", line)]


def check_command(line: str) -> str | None:
    """What is wrong with the `qubax` invocation in `line` (subcommands, options), or None."""
    rest = re.split(r"(?<![\w./\[-])(?:\./|\.venv/bin/)?qubax\s+", line, maxsplit=1)[1]
    rest = rest.split(" #", 1)[0]
    if "[" not in rest:  # outside a usage line's [a | b], `|` and `;` end the command
        rest = re.split(r"\||;|&&", rest, maxsplit=1)[0]
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    words = [w.strip("[]()`") for w in words if w.strip("[]()`|")]
    command: click.Command = main
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        if words[0] not in command.commands:
            return f"no command {words[0]!r}"
        command, words = command.commands[words[0]], words[1:]
    options = {"--help"} | {name for param in command.params for name in param.opts + param.secondary_opts}
    unknown = [w for w in words if w.startswith("-") and w.split("=")[0] not in options]
    return f"no option {unknown[0]!r} on {command.name!r}" if unknown else None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_anchor_resolves(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in links(text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: nothing here to check it against
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert broken == []


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    assert [page for page in PAGES[1:] if page.resolve() not in linked] == []
    assert len(README.read_text().splitlines()) < 250  # the README stays a first-ten-minutes read


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_qubax_command_exists_with_its_options(page: Path) -> None:
    wrong = [(line, problem) for line in command_lines(page.read_text()) if (problem := check_command(line))]
    assert wrong == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_examples_set_every_variable_they_use(page: Path) -> None:
    """A shell example may read `$NAME` only once the page has shown where NAME comes from (`export NAME=…`)."""
    assigned: set[str] = set()
    unset = []
    for body in shell_blocks(page.read_text()):
        assigned |= set(re.findall(r"(?:^|[\s;(])(?:export\s+)?([A-Za-z_]\w*)=", body, flags=re.M))
        unset += [name for name in re.findall(r"\$\{?([A-Za-z_]\w*)", body) if name not in assigned]
    assert unset == []


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The helpers above fail on a broken page, so a green run means something."""
    assert check_command("./qubax keys lst") == "no command 'lst'"
    assert check_command("qubax generate p --outdir x") == "no option '--outdir' on 'generate'"
    assert check_command("export K=$(./qubax keys create --test --name docs)  # a key") is None
    assert check_command("qubax keys webhook KEY_OR_ID [--url URL | --no-url] [--rotate-secret]") is None
    assert "page-two" not in anchors("# Page\n```sh\n# page two\n```\n")
    assert anchors("## Retries: `Idempotency-Key`\n## A\n## A\n") == {"retries-idempotency-key", "a", "a-1"}
    assert links("[a](x.md#b) `[c](d)`\n```\n[e](f)\n```\n") == ["x.md#b"]


def section(text: str, starts: str) -> str:
    """The text of the `## ` section whose heading starts with `starts`."""
    part = re.split(rf"^## {re.escape(starts)}.*$", text, maxsplit=1, flags=re.M)[1]
    return re.split(r"^## ", part, maxsplit=1, flags=re.M)[0]


def as_run_here(code: str, key: str, base_url: str) -> str:
    """The README's text with the placeholders a reader fills in filled in: their key, this server."""
    code = code.replace("qbx_test_...", key).replace("http://127.0.0.1:8000", base_url)
    return re.sub(r"(?<![\w/])\./qubax\b", f"{shlex.quote(sys.executable)} -m qubax", code)


def test_the_readme_first_image_runs_as_written(settings: Settings, base_url: str, tmp_path: Path) -> None:
    path1 = section(README.read_text(), "Path 1")
    shells = shell_blocks(path1)
    python = [body for language, body in blocks(path1) if language == "python"]
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **cli_env(settings), "HOME": str(home)}

    create = next(body for body in shells if "keys create --test" in body)
    made = subprocess.run(["bash", "-ec", as_run_here(create, "", base_url)], env=env, capture_output=True, text=True)
    key = made.stdout.strip()
    assert made.returncode == 0 and key.startswith("qbx_test_"), made.stderr

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(as_run_here(python[0], key, base_url), {})
    image = httpx.get(printed.getvalue().strip())
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    curl = next(body for body in shells if body.startswith("curl"))
    answer = subprocess.run(["bash", "-ec", as_run_here(curl, key, base_url)], capture_output=True, text=True)
    assert answer.returncode == 0 and json.loads(answer.stdout)["data"][0]["url"].startswith(base_url)

    generate = next(body for body in shells if "qubax generate" in body)
    generate = as_run_here(generate, key, base_url).replace(" generate ", f" generate --base-url {base_url}/v1 ")
    saved = subprocess.run(["bash", "-ec", generate], env=env, cwd=home, capture_output=True, text=True)
    assert saved.returncode == 0, saved.stderr
    assert len(list(home.glob("**/*.png"))) == 2
