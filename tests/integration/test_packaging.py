"""What users install: the sdist and the wheel built from a clean checkout, installed without -e into fresh venvs.

A module left out of the distribution, a file the sdist forgets, an extra that no longer
brings what its adapter imports: each fails here, the way a user would meet it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import StartApp
from .harness import REPO, free_port

TIMEOUT = 240
LISTENING = r"listening on (.+) with (\d+) workers \(master pid (\d+)\)"

# Imports every module of the installed package. Adapters whose framework is missing must say
# which extra brings it, in one line: that is what a user who installed only the core sees.
IMPORT_ALL = r"""
import importlib, pkgutil, sys
import sticky_server
from sticky_server.adapters._extras import MissingExtraError
location = sticky_server.__file__
assert "site-packages" in location, location
assert sticky_server.__path__[0].endswith("sticky_server")
imported, missing = [], {}
for info in pkgutil.walk_packages(sticky_server.__path__, "sticky_server."):
    try:
        importlib.import_module(info.name)
    except MissingExtraError as exc:
        missing[info.name] = str(exc)
    else:
        imported.append(info.name)
print("IMPORTED", " ".join(sorted(imported)))
for name, message in sorted(missing.items()):
    print("MISSING", name, "|", message)
"""

WSGI_APP = """
import os


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"hello from pid {os.getpid()}".encode()]
"""


def clean_checkout(destination: Path) -> Path:
    """The files a clean clone of this tree has: what git tracks, and new files it does not ignore."""
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.split(b"\0")
        for raw in filter(None, listed):
            source = REPO / os.fsdecode(raw)
            if source.is_file():  # a file deleted in the work tree but not yet in git
                target = destination / os.fsdecode(raw)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    else:  # running from the sdist itself
        ignored = shutil.ignore_patterns(".venv", "*.egg-info", "build", "dist", "node_modules", "__pycache__")
        shutil.copytree(REPO, destination, ignore=ignored, dirs_exist_ok=True)
    return destination


@pytest.fixture(scope="module")
def distributions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, and the wheel built from that sdist (as ``python -m build`` makes them for PyPI)."""
    work = tmp_path_factory.mktemp("packaging")
    source = clean_checkout(work / "checkout")
    out = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        check=True,
        timeout=TIMEOUT,
        stdout=subprocess.DEVNULL,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def fresh_venv(path: Path, requirement: str) -> Path:
    """A new venv (no -e, no site packages) with ``requirement`` installed; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", requirement],
        check=True,
        timeout=TIMEOUT,
    )
    return python


def test_the_wheel_ships_every_package_and_the_type_marker(distributions: dict[str, Path]) -> None:
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        names = set(wheel.namelist())
    packages = sorted(str(init.parent.relative_to(REPO)) for init in (REPO / "sticky_server").rglob("__init__.py"))
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is not in the wheel"
    sources = {str(path.relative_to(REPO)) for path in (REPO / "sticky_server").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "sticky_server/py.typed" in names


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_core_install_imports_every_module_and_names_each_missing_extra(
    kind: str, distributions: dict[str, Path], tmp_path: Path
) -> None:
    python = fresh_venv(tmp_path / "venv", str(distributions[kind]))
    result = subprocess.run([str(python), "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    imported = lines[0].split()[1:]
    assert "sticky_server.steering.bpf" in imported and "sticky_server.cli.run" in imported
    missing = {line.split()[1]: line.partition("| ")[2] for line in lines[1:]}
    assert set(missing) == {
        "sticky_server.adapters.asgi",
        "sticky_server.adapters.aiohttp",
        "sticky_server.adapters.tornado",
        "sticky_server.adapters.socketio",
        "sticky_server.adapters.channels",
        "sticky_server.adapters.broadcaster",
    }, missing
    assert "pip install 'sticky-server[asgi]'" in missing["sticky_server.adapters.asgi"]
    assert "pip install 'sticky-server[socketio]'" in missing["sticky_server.adapters.socketio"]
    assert "pip install 'sticky-server[channels]'" in missing["sticky_server.adapters.channels"]
    assert "pip install 'sticky-server[broadcaster]'" in missing["sticky_server.adapters.broadcaster"]


def test_the_console_script_of_a_core_install_serves_a_wsgi_app(
    distributions: dict[str, Path], tmp_path: Path, start_app: StartApp
) -> None:
    """The core alone serves WSGI on wsgiref, and says how to get keep-alive and websockets."""
    python = fresh_venv(tmp_path / "venv", str(distributions["wheel"]))
    (tmp_path / "hello.py").write_text(WSGI_APP)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STICKY_SERVER_", "PYTHON"))}
    env["PYTHONUNBUFFERED"] = "1"
    server = start_app(
        command=[str(python.parent / "sticky-server"), "hello:application", "-w", "2", "-b", f"127.0.0.1:{port}"],
        env=env,
        cwd=tmp_path,
        marker="hello",
    )
    server.wait_for(LISTENING, 60)
    assert "pip install 'sticky-server[wsgi]'" in server.output
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200
    assert response.read().startswith(b"hello from pid ")
    connection.close()


def test_an_asgi_app_without_its_extra_says_which_extra_in_one_line(
    distributions: dict[str, Path], tmp_path: Path
) -> None:
    python = fresh_venv(tmp_path / "venv", str(distributions["wheel"]))
    (tmp_path / "main.py").write_text("async def app(scope, receive, send):\n    pass\n")
    result = subprocess.run(
        [str(python.parent / "sticky-server"), "main:app", "-w", "2", "-b", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if not key.startswith("STICKY_SERVER_")},
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("pip install 'sticky-server[asgi]'") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "importing main:app failed" not in result.stderr


STACK_APP = """
import asyncio, json, sys

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    http = "httptools" if "uvicorn.protocols.http.httptools_impl" in sys.modules else "h11"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"loop": loop, "http": http}).encode()})
"""


def test_the_asgi_extra_brings_the_fast_stack_and_the_command_uses_it_without_a_flag(
    distributions: dict[str, Path], tmp_path: Path, start_app: StartApp
) -> None:
    python = fresh_venv(tmp_path / "venv", f"sticky-server[asgi] @ {distributions['wheel'].as_uri()}")
    result = subprocess.run(
        [str(python), "-c", "import sticky_server.adapters.asgi, websockets, httptools, uvloop"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "stack.py").write_text(STACK_APP)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STICKY_SERVER_", "PYTHON"))}
    env["PYTHONUNBUFFERED"] = "1"
    for flags, expected in (
        ([], {"loop": "uvloop", "http": "httptools"}),
        (["--loop", "asyncio", "--http", "h11"], {"loop": "asyncio", "http": "h11"}),
    ):
        port = free_port()
        command = [str(python.parent / "sticky-server"), "stack:app", "-w", "1", "-b", f"127.0.0.1:{port}", *flags]
        server = start_app(command=command, env=env, cwd=tmp_path, marker="stack")
        server.wait_for(LISTENING, 60)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            connection.request("GET", "/")
            assert json.loads(connection.getresponse().read()) == expected, flags
        finally:
            connection.close()
        assert server.stop(30) == 0


def test_every_extra_that_serves_http_brings_the_fast_stack(distributions: dict[str, Path]) -> None:
    # What the wheel declares: the extras that put an app on an event loop bring uvloop, uvicorn's bring httptools.
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
        requires = [line for line in wheel.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]

    def brings(extra: str) -> set[str]:
        named = [line.split(":", 1)[1].strip() for line in requires if f'extra == "{extra}"' in line]
        return {re.split(r"[\s\[<>=;]", requirement, maxsplit=1)[0].lower() for requirement in named}

    assert {"uvicorn", "websockets", "httptools", "uvloop"} <= brings("asgi")
    assert {"httptools", "uvloop"} <= brings("socketio")
    assert {"aiohttp", "uvloop"} <= brings("aiohttp")
    assert any("aiohttp[speedups]" in line and 'extra == "aiohttp"' in line for line in requires), requires
    assert {"tornado", "uvloop"} <= brings("tornado")
    # matplotlib draws bench/peers.py's chart: the bench extra's, never the library's.
    assert "matplotlib" in brings("bench")
    assert not any("matplotlib" in line and "extra ==" not in line for line in requires)
