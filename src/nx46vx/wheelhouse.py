"""``nx46vx wheelhouse DIR``: a folder of wheels for an offline Kaggle notebook.

Kaggle's scoring notebooks run with the internet off, so the package is installed
with ``pip install --no-index --find-links /kaggle/input/<dataset> nx46vx``. The
wheels are rebuilt from the distributions installed here (their ``RECORD`` lists
every file, their ``WHEEL`` file the original tags), so this works offline and
yields the same builds this machine runs; Kaggle's image already holds the heavy
scientific stack, so by default only nx46vx and the dependencies it usually lacks
are packed (``include_all`` packs the whole requirement closure). An editable
install is built with ``pip wheel`` from its source folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from .errors import Nx46Error

log = logging.getLogger("nx46vx")

# Usually missing from Kaggle's Python image; everything else nx46vx needs is preinstalled there.
DEFAULT_PACKAGES = ("nx46vx", "dynamic-network-architectures", "imagecodecs", "orjson", "nvidia-ml-py", "tifffile")
_SKIP_SUFFIXES = (".pyc",)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INSTALL_TIME = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _compressed_tag(wheel_text: str) -> str:
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def _source_tree(dist: metadata.Distribution) -> Path | None:
    """The project folder to build from when the installed files cannot be repacked.

    That is an editable install (``direct_url.json`` says so) or nx46vx imported
    from a source checkout (``egg-info`` metadata, no ``dist-info`` RECORD).
    """
    text = dist.read_text("direct_url.json")
    if text:
        info = json.loads(text)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            return Path(info["url"][len("file://") :])
    has_record = any(str(f).split("/")[0].endswith(".dist-info") for f in dist.files or [])
    if not has_record and _normalise(dist.metadata["Name"]) == "nx46vx":
        root = Path(__file__).resolve().parents[2]
        if (root / "pyproject.toml").is_file():
            return root
    return None


def repack(name: str, folder: Path) -> Path:
    """Write the wheel of the installed distribution ``name`` into ``folder``; returns its path."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise Nx46Error("package is not installed, so it cannot be packed", expected=f"{name} installed", found="nothing") from None
    source = _source_tree(dist)
    if source is not None:
        before = set(folder.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(source)], check=True, capture_output=True)
        return sorted(set(folder.glob("*.whl")) - before or folder.glob(f"{_normalise(name)}-*.whl"))[-1]
    version = dist.version
    base = Path(dist.locate_file(""))
    wheel_name = f"{_normalise(dist.metadata['Name'])}-{version}-{_compressed_tag(dist.read_text('WHEEL') or '')}.whl"
    files = [f for f in (dist.files or []) if not str(f).startswith("..") and not str(f).endswith(_SKIP_SUFFIXES) and "__pycache__" not in str(f)]
    dist_info = next((str(f).split("/")[0] for f in files if str(f).split("/")[0].endswith(".dist-info")), None)
    if not files or dist_info is None:
        raise Nx46Error("installed package lists no files", path=base, expected="a RECORD of installed files", found="none")
    target = folder / wheel_name
    records = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for f in files:
            arcname = str(f).replace(os.sep, "/")
            if arcname.startswith(f"{dist_info}/") and arcname.split("/")[-1] in _INSTALL_TIME:
                continue
            data = (base / f).read_bytes()
            wheel.writestr(arcname, data)
            records.append(_record_line(arcname, data))
        records.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return target


def requirement_closure(name: str) -> list[str]:
    """``name`` and every installed distribution it requires (requirements behind an ``extra`` skipped).

    Other environment markers are not evaluated: a requirement that does not apply
    here is simply not installed, and is skipped.
    """
    seen: dict[str, str] = {}
    stack = [name]
    while stack:
        current = stack.pop()
        key = _normalise(current)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(current)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.metadata["Name"]
        for raw in dist.requires or []:
            requirement, _, marker = raw.partition(";")
            match = _NAME.match(requirement.strip())
            if match and "extra" not in marker:
                stack.append(match.group(0))
    return sorted(seen.values(), key=str.lower)


def build_wheelhouse(folder: str | os.PathLike[str], *, include_all: bool = False, packages: tuple[str, ...] = DEFAULT_PACKAGES) -> list[Path]:
    """Pack wheels into ``folder`` (created); returns the wheel paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = requirement_closure("nx46vx") if include_all else list(packages)
    return [repack(name, folder) for name in names]
