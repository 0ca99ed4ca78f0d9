"""The `qubax` command, run in-process through click's CliRunner."""

import asyncio
import hashlib
import inspect
import io
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from qubax.records import db, queries, tables
from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.catalog import MODELS
from tests.conftest import cli_env
from tests.stack import running_stack
from tests.test_readme import free_port


def runner() -> CliRunner:
    """A runner that keeps stdout and stderr apart (click < 8.2 needs mix_stderr=False; later ones always do)."""
    options: dict[str, Any] = {}
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        options["mix_stderr"] = False
    return CliRunner(**options)


def qubax(settings: Settings, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner().invoke(main, list(args), env={**cli_env(settings), **(env or {})})


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def create(settings: Settings, *args: str) -> str:
    return ok(qubax(settings, "keys", "create", *args)).removesuffix("\n")


def table(stdout: str) -> list[list[str]]:
    """The rows of a printed table, header included, split on whitespace."""
    return [line.split() for line in stdout.splitlines()]


def key_id(settings: Settings, key: str) -> str:
    async def find() -> tables.ApiKey | None:
        engine = db.connect(settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            found = await queries.find_key(session, hashlib.sha256(key.encode()).hexdigest())
        await engine.dispose()
        return found

    found = asyncio.run(find())
    assert found is not None
    return found.id


# keys


def test_keys_create_prints_only_the_key_on_stdout(settings: Settings) -> None:
    result = qubax(settings, "keys", "create")
    stdout = ok(result)
    assert stdout.count("\n") == 1
    key = stdout.removesuffix("\n")
    assert key.startswith("qbx_live_") and len(key) >= len("qbx_live_") + 43
    assert key not in result.stderr
    assert f"Created live key {key_id(settings, key)} (no limits)." in result.stderr


def test_keys_create_test(settings: Settings) -> None:
    result = qubax(settings, "keys", "create", "--test")
    assert ok(result).startswith("qbx_test_")
    assert "Created test key key_" in result.stderr


def test_keys_list_shows_names_and_prefixes_never_keys(settings: Settings) -> None:
    live = create(settings, "--name", "ci-bot", "--rpm", "5", "--monthly-budget-usd", "12.5")
    test = create(settings, "--test", "--name", "sandbox")
    stdout = ok(qubax(settings, "keys", "list"))
    rows = table(stdout)
    assert rows[0] == ["ID", "KEY", "KIND", "NAME", "CREATED", "LIMITS", "STATUS"]
    assert [(r[0], r[1], r[2], r[3], r[-1]) for r in rows[1:]] == [
        (key_id(settings, live), live[:13] + "…", "live", "ci-bot", "active"),
        (key_id(settings, test), test[:13] + "…", "test", "sandbox", "active"),
    ]
    assert "  rpm 5, monthly budget $12.50  active" in stdout.splitlines()[1]
    assert "  no limits" in stdout.splitlines()[2]
    for key in (live, test):
        assert key not in stdout
        assert key[13:17] not in stdout


def test_keys_list_when_there_are_none(settings: Settings) -> None:
    assert table(ok(qubax(settings, "keys", "list"))) == [["ID", "KEY", "KIND", "NAME", "CREATED", "LIMITS", "STATUS"]]


def test_revoke_by_full_key_and_by_id(settings: Settings) -> None:
    by_key = create(settings, "--name", "a")
    by_id = create(settings, "--name", "b")
    create(settings, "--name", "c")
    first = ok(qubax(settings, "keys", "revoke", by_key))
    assert first == f"Revoked {key_id(settings, by_key)} ({by_key[:13]}…).\n"
    assert ok(qubax(settings, "keys", "revoke", key_id(settings, by_id))).startswith(
        f"Revoked {key_id(settings, by_id)} "
    )
    status = {row[3]: row[-1] for row in table(ok(qubax(settings, "keys", "list")))[1:]}
    assert status == {"a": "revoked", "b": "revoked", "c": "active"}
    again = ok(qubax(settings, "keys", "revoke", by_key))
    assert again.startswith(f"{key_id(settings, by_key)} ({by_key[:13]}…) was already revoked, on ")


def test_update_says_what_changed(settings: Settings) -> None:
    key = create(settings, "--rpm", "60", "--monthly-budget-usd", "5")
    changed = ok(
        qubax(settings, "keys", "update", key, "--rpm", "120", "--monthly-budget-usd", "0", "--max-concurrent", "4")
    )
    assert (
        changed
        == f"Updated {key_id(settings, key)}: rpm 60 → 120, max concurrent none → 4, monthly budget $5.00 → none.\n"
    )
    assert (
        ok(qubax(settings, "keys", "update", key, "--rpm", "120")) == f"Nothing changed for {key_id(settings, key)}.\n"
    )


@pytest.mark.parametrize("target", ["key_0000000000000000", "qbx_live_" + "A" * 43, ""])
def test_revoke_unknown_fails(settings: Settings, target: str) -> None:
    create(settings)
    result = qubax(settings, "keys", "revoke", target)
    assert result.exit_code == 1
    assert "No such key." in result.stderr
    assert result.stdout == ""
    assert table(ok(qubax(settings, "keys", "list")))[1][-1] == "active"


# models


def model_rows(stdout: str) -> dict[str, str]:
    table = stdout.split("\n\n")[0]  # the note on credentials follows a blank line
    return {line.split()[0]: line for line in table.splitlines()[1:]}


def test_models_without_credentials_say_what_to_set(settings: Settings) -> None:
    output = ok(qubax(settings, "models"))
    rows = model_rows(output)
    assert list(rows) == [m.id for m in MODELS]
    assert rows["flux-1.1-pro"].endswith("  bfl, fal, replicate, together")
    assert rows["flux-1-schnell"].endswith("  together, fal, replicate")
    assert rows["flux-1-schnell"].split()[1:4] == ["1024x1024", "1-4", "$0.003"]
    assert rows["dall-e-3"].split()[1:5] == ["1024x1024", "1", "from", "$0.04"]  # the price depends on quality
    assert rows["flux-2-pro"].split()[1:4] == ["1024x1024", "1-4", "$0.03+0.015/MP"]  # by megapixel
    assert "To enable a route, set its credential: BFL_API_KEY (bfl), FAL_KEY (fal)," in output
    # Fits a terminal: the longest ids (Imagen 4's) are 29 characters.
    assert max(len(line) for line in output.splitlines()[:5]) <= 120
    assert "  gemini-3.1-flash-image: gemini-3.1-flash-image-preview, nano-banana-2\n" in output


def test_models_with_a_credential_say_configured(settings: Settings) -> None:
    output = ok(qubax(settings, "models", env={"BFL_API_KEY": "bfl-secret-123,bfl-second"}))
    rows = model_rows(output)
    assert rows["flux-1.1-pro"].endswith("  bfl*, fal, replicate, together")
    assert rows["flux-1.1-pro-ultra"].endswith("  bfl*, fal, replicate")
    assert "*" not in rows["flux-1-schnell"]
    assert "BFL_API_KEY" not in output and "bfl-secret-123" not in output


def test_models_ask_the_running_server(settings: Settings) -> None:
    """The server has BFL's credential, this shell none: the server's answer is the one shown."""
    with running_stack(settings, providers=("bfl",)) as stack:
        result = qubax(settings, "models", "--base-url", f"{stack.url}/v1", env={"QUBAX_API_KEY": stack.live_key})
        wrong = {"QUBAX_API_KEY": "qbx_live_wrong"}
        refused = qubax(settings, "models", "--base-url", f"{stack.url}/v1", env=wrong)
    rows = model_rows(ok(result))
    assert f"Asked the server at {stack.url}/v1" in result.stderr
    assert rows["flux-1.1-pro"].split()[1] == "yes" and rows["flux-1.1-pro"].endswith("  bfl, fal, replicate, together")
    assert rows["seedream-4.5"].split()[1] == "no"
    assert "*" not in result.stdout and "To enable a route" not in result.stdout
    assert refused.exit_code == 1
    assert f"The server at {stack.url}/v1 refused to list its models: 401: Incorrect API key" in refused.stderr


def test_models_without_a_server_say_whose_settings_they_show(settings: Settings) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    result = qubax(settings, "models", "--base-url", closed, env={"QUBAX_API_KEY": "qbx_test_x"})
    assert f"no server answered at {closed}: this shows this shell's settings" in result.stderr
    assert "no QUBAX_API_KEY to ask a server with: this shows this shell's settings" in qubax(settings, "models").stderr


def test_models_say_which_route_is_a_stand_in(settings: Settings) -> None:
    rows = model_rows(ok(qubax(settings, "models")))
    assert rows["dall-e-3"].endswith("  openai, openai:gpt-image-2 (stand-in)")


def test_models_show_the_operator_catalog(settings: Settings, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[models."flux-1.1-pro"]\naliases = ["flux-pro"]\nroutes = [{ provider = "fal" }, { provider = "bfl" }]\n'
    )
    output = ok(qubax(settings, "models", env={"QUBAX_CATALOG": str(catalog)}))
    rows = model_rows(output)
    assert "\nAliases:\n  flux-1.1-pro: flux-pro\n" in output
    assert rows["flux-1.1-pro"].endswith("  fal, bfl")


def test_models_show_shutdown_dates(settings: Settings, tmp_path: Path) -> None:
    """Below the table, with each model's successor."""
    output = ok(qubax(settings, "models"))
    assert "\n  dall-e-3: 2026-05-12 (successor: gpt-image-2)\n" in output
    assert "\n  gpt-image-1: 2026-10-23 (successor: gpt-image-2)\n" in output
    assert "\n  gpt-image-1-mini: 2026-12-01 (successor: gpt-image-2)\n" in output
    assert "\n  gpt-image-2:" not in output  # none announced
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models."gpt-image-2"]\nshutdown_date = 2027-06-30\n')
    output = ok(qubax(settings, "models", env={"QUBAX_CATALOG": str(catalog)}))
    assert "\n  gpt-image-2: 2027-06-30\n" in output


def test_a_broken_catalog_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models."flux-1.1-pro"]\nroutes = [{ provider = "midjourney" }]\n')
    for command in (("models",), ("serve",)):
        result = qubax(settings, *command, env={"QUBAX_CATALOG": str(catalog)})
        assert result.exit_code == 1
        assert "models.flux-1.1-pro.routes.0.provider: unknown provider 'midjourney'" in result.stderr


# usage


def post(base_url: str, key: str, **body: Any) -> httpx.Response:
    body = {"model": "flux-1-schnell", "prompt": "a fox", "size": "256x256", "response_format": "b64_json", **body}
    return httpx.post(f"{base_url}/v1/images/generations", json=body, headers={"authorization": f"Bearer {key}"})


def test_usage_counts_test_key_images_at_no_cost(settings: Settings, base_url: str, test_key: str) -> None:
    assert table(ok(qubax(settings, "usage"))) == [["KEY", "NAME", "MODEL", "REQUESTS", "IMAGES", "COST"]]
    assert post(base_url, test_key).status_code == 200
    assert post(base_url, test_key, response_format="url").status_code == 200
    assert post(base_url, test_key, model="dall-e-3", size="1024x1024").status_code == 200
    rows = table(ok(qubax(settings, "usage")))
    kid = key_id(settings, test_key)
    assert rows[1:] == [
        [kid, "test", "dall-e-3", "1", "1", "$0.0000"],
        [kid, "test", "flux-1-schnell", "2", "2", "$0.0000"],
    ]


# generate


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.format == "PNG"
        return image.size


def test_generate_saves_pngs_and_prints_their_paths(base_url: str, test_key: str, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    result = runner().invoke(
        main,
        [
            "generate",
            "a red fox",
            "--api-key",
            test_key,
            "-n",
            "2",
            "--out",
            str(out),
            "--size",
            "512x512",
            "--model",
            "flux-1-schnell",
            "--base-url",
            base_url + "/v1",
        ],
    )
    paths = [Path(line) for line in ok(result).splitlines()]
    assert len(paths) == 2
    assert sorted(paths) == sorted(out.iterdir())
    assert all(p.name.startswith("flux-1-schnell-") and p.suffix == ".png" for p in paths)
    assert [png_size(p) for p in paths] == [(512, 512), (512, 512)]
    assert paths[0].read_bytes() != paths[1].read_bytes()


@pytest.mark.parametrize("pictures", [True, False])
def test_generate_without_out_saves_in_the_pictures_or_data_folder(
    base_url: str, test_key: str, tmp_path: Path, pictures: bool
) -> None:
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True) if pictures else home.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "QUBAX_DATA_DIR": str(tmp_path / "data")}
    result = runner().invoke(
        main, ["generate", "a fox", "--api-key", test_key, "--base-url", base_url + "/v1", "--size", "256x256"], env=env
    )
    folder = home / "Pictures" / "qubax" if pictures else tmp_path / "data" / "generated"
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert f"Saving in {folder} " in result.stderr
    (saved,) = folder.iterdir()
    assert result.stdout == f"{saved}\n"


def test_generate_takes_the_key_from_the_environment(base_url: str, test_key: str, tmp_path: Path) -> None:
    result = runner().invoke(
        main,
        ["generate", "p", "--out", str(tmp_path), "--base-url", base_url + "/v1", "--model", "dall-e-3"],
        env={"QUBAX_API_KEY": test_key},
    )
    [path] = [Path(line) for line in ok(result).splitlines()]
    assert png_size(path) == (1024, 1024)


def test_generate_with_a_bad_key_fails_with_the_401_message(base_url: str, tmp_path: Path) -> None:
    result = runner().invoke(
        main,
        ["generate", "p", "--api-key", "qbx_live_nope", "--out", str(tmp_path / "out"), "--base-url", base_url + "/v1"],
    )
    assert result.exit_code == 1
    assert "401: Incorrect API key provided: qbx_live_nop***." in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_generate_with_an_invalid_size_names_the_constraint(base_url: str, test_key: str, tmp_path: Path) -> None:
    result = runner().invoke(
        main,
        [
            "generate",
            "p",
            "--api-key",
            test_key,
            "--size",
            "500x500",
            "--model",
            "flux-1-schnell",
            "--out",
            str(tmp_path / "out"),
            "--base-url",
            base_url + "/v1",
        ],
    )
    assert result.exit_code == 1
    assert "400: The size 500x500 is not supported by flux-1-schnell" in result.stderr
    assert "between 256 and 1440 and a multiple of 32" in result.stderr
    assert not (tmp_path / "out").exists()


def test_generate_without_a_server_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    result = runner().invoke(
        main, ["generate", "p", "--api-key", "qbx_test_x", "--out", str(tmp_path), "--base-url", url]
    )
    assert result.exit_code == 1
    assert f"Could not reach {url}/images/generations" in result.stderr
    assert "Start it with `qubax serve`" in result.stderr


def test_generate_without_a_key_fails(tmp_path: Path) -> None:
    result = runner().invoke(main, ["generate", "p", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--api-key or set QUBAX_API_KEY" in result.stderr


def test_generate_async_waits_on_a_job(base_url: str, test_key: str, tmp_path: Path) -> None:
    result = runner().invoke(
        main,
        ["generate", "p", "--async", "--api-key", test_key, "--out", str(tmp_path), "--base-url", base_url + "/v1"],
    )
    [path] = [Path(line) for line in ok(result).splitlines()]
    assert png_size(path) == (1024, 768)  # flux-1.1-pro's default size
    assert result.stderr.startswith("job job_")


def test_jobs_list_show_and_cancel(base_url: str, test_key: str, settings: Settings, tmp_path: Path) -> None:
    headers = {"authorization": f"Bearer {test_key}", "prefer": "respond-async"}
    body = {"model": "flux-1.1-pro", "prompt": "p", "response_format": "b64_json"}
    job_id = httpx.post(f"{base_url}/v1/images/generations", json=body, headers=headers).json()["id"]
    env = cli_env(settings)
    deadline = time.monotonic() + 10
    while job_id + "  " not in (
        listed := ok(runner().invoke(main, ["jobs", "list", "--status", "succeeded"], env=env))
    ):
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)
    assert listed.splitlines()[0].split() == ["ID", "KEY", "MODEL", "STATUS", "CREATED", "ENDED"]
    assert ok(runner().invoke(main, ["jobs", "list", "--key", test_key], env=env)).count(job_id) == 1
    assert job_id not in ok(runner().invoke(main, ["jobs", "list", "--status", "queued"], env=env))
    shown = ok(runner().invoke(main, ["jobs", "show", job_id], env=env))
    assert "status:   succeeded" in shown and "images:   1" in shown and "model:    flux-1.1-pro" in shown
    assert ok(runner().invoke(main, ["jobs", "cancel", job_id], env=env)).strip() == f"{job_id}: succeeded."
    missing = runner().invoke(main, ["jobs", "show", "job_nope"], env=env)
    assert missing.exit_code == 1 and "No job job_nope." in missing.stderr
    assert runner().invoke(main, ["jobs", "cancel", "job_nope"], env=env).exit_code == 1
