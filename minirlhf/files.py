"""Files that are never seen half-written: every write goes to a temporary file, then a rename.

`load_torch` is the kit's only `torch.load`, always with weights_only=True: a checkpoint can
hold tensors and plain containers, never code.
"""
import json
import os
import pickle
from pathlib import Path

import torch

from minirlhf.config import ConfigError


class WriteError(ConfigError):
    """A file could not be written (a full disk, no permission); the previous file is kept whole."""


def atomic_write_text(path, text):
    """Write to a temporary file, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_then_rename(lambda: tmp.write_text(text), tmp, path)


def _write_then_rename(write, tmp, path):
    """Run `write` (which fills `tmp`), then rename `tmp` to `path`. On a failure (a full disk)
    the temporary file is removed and the previous `path` stays as it was."""
    try:
        write()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, NotImplementedError):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
            raise WriteError(f"cannot write {path}: {why}; the previous file, if any, is unchanged "
                             "(free some space or pick a writable --out, then rerun or --resume)") from None
        raise


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def existing_file(path):
    """`path` as a Path if it is an existing file; otherwise a one-line ConfigError saying which."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    return path


def read_json(path):
    """The JSON value in `path`; a missing, unreadable or malformed file is a one-line ConfigError."""
    path = existing_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None


def save_torch(obj, path):
    """torch.save to a temporary file, then rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_then_rename(lambda: torch.save(obj, tmp), tmp, path)


def load_torch(path, map_location="cpu"):
    """torch.load with weights_only=True; a missing, truncated or tampered file is a clear error."""
    path = existing_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint: {_load_problem(e)}") from None


def _load_problem(error):
    """One line on why torch.load failed (its own messages run over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):      # weights_only=True refused an object
        refused = next((line for line in lines if "GLOBAL" in line or "global" in line), "")
        return ("it holds objects other than tensors and plain containers, which minirlhf never loads "
                f"(weights_only=True){': ' + refused.rstrip('.') if refused else ''}")
    first = lines[0].split(". ")[0] if lines else ""
    return f"truncated or corrupted ({type(error).__name__}{': ' + first[:160] if first else ''})"
