"""Atomic writes: a temp file (or folder) beside the target, renamed in when complete, so a
failure leaves the old file or nothing, never half of one. Results get the usual permissions
(0666/0777 less the umask), not mkstemp's private 0600.

Output conventions, the same for every command: a missing folder on the way to an output is
created; an image is written in the format its extension names (IMAGE_FORMATS), and any other
extension is refused before any work."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sdrt.errors import UserError


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LOSSY_QUALITY = 95          # JPEG / WebP


def image_format(path: Path, flag: str = "--out") -> str:
    """PIL's format name for an image output path, from its extension; UserError otherwise."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{flag} {path}: give an image file name ending in .png, .jpg, .jpeg or .webp "
                        "(the format follows the extension)")
    return fmt


def make_parent(path: Path) -> None:
    """Create the folders on the way to an output file (one rule for every command)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def default_mode(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def default_mode_tree(root: Path) -> None:
    """default_mode on `root` and everything under it: for folders that libraries wrote with
    their own modes (onnx writes external data files 0600), before they are renamed in."""
    root = Path(root)
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            default_mode(path)


def temp_dir_beside(target: Path) -> Path:
    """An empty hidden folder next to `target`, to be renamed onto it when complete."""
    parent = Path(target).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.tmp.", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror}") from None
    default_mode(tmp)
    return tmp


@contextmanager
def atomic_dir(target: Path):
    """Yields an empty folder beside `target`; when the block completes it replaces `target` (or
    becomes it), and when the block fails it is removed, so `target` is never half-written."""
    target = Path(target)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yields a temp path beside `path`; renamed onto `path` if the block completes."""
    path = Path(path)
    make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        default_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def save_images(images: list, paths: list[Path]) -> None:
    """PIL images in the format each path's extension names (image_format), all or nothing:
    every image goes to a temp file first; all are renamed in only when every one was written
    (the ExitStack closes the atomic paths together)."""
    path = paths[0]
    try:
        with ExitStack() as stack:
            for img, path in zip(images, paths):
                fmt = image_format(path)
                options = {} if fmt == "PNG" else {"quality": LOSSY_QUALITY}
                img.save(stack.enter_context(atomic_path(path, path.suffix)), format=fmt, **options)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
