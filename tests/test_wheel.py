"""The package as a user installs it: a wheel built from the sources, installed into a fresh venv outside
the checkout, run from another folder. Templates, static files, migrations, the built-in catalog and
Swagger UI's assets must all come from the installed package, and data from the platform's data folder."""

import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.test_connection import stop
from tests.test_readme import ROOT, free_port, wait_for_health

pytestmark = pytest.mark.slow
ADMIN_TOKEN = secrets.token_hex(32)


def build_wheel(tmp: Path) -> tuple[Path, str]:
    """A wheel of a copy of the sources (a build in the checkout would leave build/ there, and a stale
    build/lib could hide a missing file), its version marked so that `--version` must come from the
    installed metadata; returns the wheel and that version."""
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    shutil.copy(ROOT / "README.md", source)
    project = (ROOT / "pyproject.toml").read_text()
    version = tomllib.loads(project)["project"]["version"] + "+wheeltest"
    marked = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', project, count=1)
    (source / "pyproject.toml").write_text(marked)
    # Build isolation fetches the build backend pyproject.toml asks for, as `pipx install .` would.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(tmp / "dist"), str(source)], check=True)
    (wheel,) = (tmp / "dist").glob("qubax-*.whl")
    return wheel, version


def installed(tmp: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel and its dependencies, resolved from the package index as a user's
    install is (so a dependency missing from pyproject.toml fails here); returns its bin folder."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)], check=True)
    return venv / "bin"


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: no Qubax variables, no venv or import path of ours, a home of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QUBAX_", "VIRTUAL_ENV", "PYTHON", "XDG_")) and k != "HOME"
    }
    return env | {"HOME": str(home)}


def run(bin_dir: Path, cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel, version = build_wheel(tmp)
    yield installed(tmp, wheel), version


def test_installed_wheel_serves_from_any_folder(package: tuple[Path, str], tmp_path: Path) -> None:
    bin_dir, version = package
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    env = user_env(home)
    assert run(bin_dir, elsewhere, env, "qubax", "--version") == f"qubax, version {version}"
    module = run(bin_dir, elsewhere, env, "python", "-c", "import qubax; print(qubax.__file__)")
    assert Path(module).is_relative_to(bin_dir.parent), module
    data = Path(
        run(bin_dir, elsewhere, env, "python", "-c", "import platformdirs as p; print(p.user_data_dir('qubax'))")
    )
    assert data.is_relative_to(home), data

    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(bin_dir / "qubax"), "serve", "--port", str(port)],
            cwd=elsewhere,
            env={**env, "QUBAX_ADMIN_TOKEN": ADMIN_TOKEN},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started(url, server, log)
        key = run(bin_dir, elsewhere, env, "qubax", "keys", "create", "--test")
        assert key.startswith("qbx_test_")
        client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
        image = client.images.generate(model="flux-1-schnell", prompt="a cat in space", size="512x512").data[0]
        assert image.url is not None
        assert httpx.get(image.url).content.startswith(b"\x89PNG")
        check_pages(url, version)
    finally:
        if server.poll() is None:
            stop(server, log)
    assert (data / "qubax.db").is_file(), sorted(home.rglob("*"))
    assert not any(elsewhere.iterdir()), "serve wrote into the folder it was started from"


def started(url: str, server: "subprocess.Popen[bytes]", log: Path) -> None:
    try:
        wait_for_health(url, server, 60)
    except AssertionError as exc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        pytest.fail(f"`qubax serve` from the wheel: {exc}; its log ends:\n{tail}")


def check_pages(url: str, version: str) -> None:
    """/docs loads Swagger UI's script and styles from this server; the console signs in, renders its
    overview and loads its own files."""
    assert httpx.get(f"{url}/openapi.json").json()["info"]["version"] == version
    docs = httpx.get(f"{url}/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+\.(?:js|css))['"]""", docs)
    assert {Path(a).name for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}, assets
    with httpx.Client(base_url=url, headers={"origin": url}, follow_redirects=True) as browser:
        overview = browser.post("/console/sign-in", data={"token": ADMIN_TOKEN})
        assert overview.status_code == 200 and overview.url.path == "/console", overview.url
        assert 'aria-current="page">Overview<' in overview.text
        assets += re.findall(r"""(?:src|href)=['"]([^'"]+\.(?:js|css|svg))['"]""", overview.text)
        assert {Path(a).name for a in assets} >= {"console.css", "console.js", "favicon.svg"}, assets
        for asset in assets:
            assert asset.startswith("/"), f"{asset} is not served by Qubax itself"
            answer = browser.get(asset)
            assert answer.status_code == 200 and answer.content, asset
