"""A local wheelhouse for emulated machines, which have no way to the package registries: every wheel that
`pip install "ray[default]==VERSION" ./kimi-cluster` needs on a node (and what pip needs to build
kimi-cluster itself), gathered once per test run.

ggml-python is packed from this environment's own installation: built from source it compiles for minutes,
and this way the nodes run the very build the tests ran. Everything else is downloaded as wheels.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

PACKED = "ggml-python"
LEFT_OUT = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}  # written by the installer, not the wheel


def build_wheelhouse(folder: Path, project: Path, ray_requirement: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pack_installed(PACKED, folder)
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    dependencies, build = pyproject["project"]["dependencies"], pyproject["build-system"]["requires"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(folder),
                    "--find-links", str(folder), ray_requirement, "wheel", *build, *dependencies],
                   check=True, capture_output=True, text=True)
    return folder


def pack_installed(name: str, folder: Path) -> Path:
    """The installed distribution `name` as a wheel again: its files as installed, with a fresh RECORD."""
    distribution = importlib.metadata.distribution(name)
    info = next(f for f in distribution.files if f.name == "WHEEL").parent
    tag = next(line.split(": ", 1)[1] for line in distribution.read_text("WHEEL").splitlines()
               if line.startswith("Tag: "))
    normalized = distribution.metadata["Name"].replace("-", "_")
    path = folder / f"{normalized}-{distribution.version}-{tag}.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in distribution.files:
            parts = Path(file).parts
            if ".." in parts or "__pycache__" in parts or (file.parent == info and file.name in LEFT_OUT):
                continue
            data = file.locate().read_bytes()
            wheel.writestr(str(file), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{file},sha256={digest},{len(data)}")
        wheel.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return path
