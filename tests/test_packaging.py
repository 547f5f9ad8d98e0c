"""pyproject.toml: the wheel `pip install .` builds carries the package, its console files,
the `ws-gateway` command and requirements.txt's pins, and runs outside the checkout."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support.processes import PROCESS_START_TIMEOUT_S, gateway_environment

PROJECT = Path(__file__).resolve().parent.parent


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the project (building in place would leave build/ behind)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(PROJECT / name, source / name)
    shutil.copytree(PROJECT / "wsgateway", source / "wsgateway", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                   timeout=4 * PROCESS_START_TIMEOUT_S)
    (wheel,) = (tmp_path / "dist").glob("ws_gateway-*.whl")
    return wheel


def test_wheel_has_the_command_the_console_and_the_pins(tmp_path):
    """The wheel declares the ws-gateway entry point, holds the console's files and requires every pin."""
    from wsgateway import __version__

    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"ws_gateway-{__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"ws_gateway-{__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {"wsgateway/__main__.py", "wsgateway/client.py", "wsgateway/console/index.html",
            "wsgateway/console/console.js"} <= names
    assert not any(name.startswith("tests/") for name in names)
    assert "ws-gateway = wsgateway.__main__:main" in entry_points
    pins = [line.split("#")[0].strip() for line in (PROJECT / "requirements.txt").read_text().splitlines()]
    for pin in filter(None, pins):
        assert f"Requires-Dist: {pin}" in metadata, pin


def test_installed_package_runs_outside_the_checkout(tmp_path):
    """Unpacked from the wheel, far from the checkout: python -m wsgateway, the entry point and wsgateway.client work."""
    from wsgateway import __version__

    site = tmp_path / "site"
    with zipfile.ZipFile(build_wheel(tmp_path)) as archive:
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = gateway_environment(PYTHONPATH=str(site))
    for command in ([sys.executable, "-P", "-m", "wsgateway", "-version"],
                    [sys.executable, "-P", "-c", "import sys; sys.argv[1:] = ['--version']; "
                     "from wsgateway.__main__ import main; sys.exit(main())"]):
        result = subprocess.run(command, cwd=elsewhere, env=environment, capture_output=True, text=True,
                                timeout=PROCESS_START_TIMEOUT_S)
        assert (result.returncode, result.stdout) == (0, f"ws-gateway {__version__}\n"), result.stderr
    result = subprocess.run([sys.executable, "-P", "-c", "import wsgateway.client as c; print(c.__file__)"],
                            cwd=elsewhere, env=environment, capture_output=True, text=True,
                            timeout=PROCESS_START_TIMEOUT_S)
    assert result.stdout.strip() == str(site / "wsgateway" / "client.py"), result.stderr
